"""Typed settings of one experiment (one YAML file). Defaults live here; a YAML says what differs.

Values the paper gives are marked "paper"; every other choice is ours and explained beside it.
One file on purpose, though long: every setting of an experiment, its default and its validation in one
place, so that a default is never stated twice and a reader finds any of them here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from selfrank.ranking.config import RankingConfig
from selfrank.errors import UserError
from selfrank.validate import check_choice, check_range

TASK_KINDS = ("synthetic", "qa", "dialogue")
SFT_METHODS = ("full", "lora", "bitfit", "adapter", "none")
# How K answers per prompt are decoded (train.sampling.generation.generate's method; the same answers either way):
# "shared_prefix" prefills each prompt once and forks its cache to its answers; "repeat" runs
# model.generate over K copies of each prompt (K prefills; kept for comparison).
SAMPLERS = ("shared_prefix", "repeat")
STAGES = ("sft", "sample", "reward", "ppo", "eval")
LR_SCHEDULES = ("constant", "linear", "cosine")


# Where a variant's PPO reward comes from: "reward_model" (a reward model trained on the ranked pairs,
# reward/<v>/model) or "group_ranking" (no reward model: each prompt's PPO rollout answers are ranked
# against each other and an answer's TextRank centrality, standardised within its group, is its reward).
REWARD_SOURCES = ("reward_model", "group_ranking")


@dataclass(frozen=True)
class Variant:
    loss: str | None  # reward-model loss: "pairwise" -log sigmoid(r_w - r_l) (paper) or "listwise" (Plackett-Luce)
    use_noise: bool  # train the RM on the perturbed losers (the paper's "+ noise")
    online_rm: bool  # refresh the RM from ranked rollouts during PPO
    reward_source: str = "reward_model"  # see REWARD_SOURCES

    def __post_init__(self):
        check_choice("Variant.reward_source", self.reward_source, REWARD_SOURCES)

    @property
    def needs_reward_model(self) -> bool:
        return self.reward_source == "reward_model"


# str_direct's reward ranks each prompt's PPO answers against each other: with two answers the similarity
# graph is symmetric, so both are always equally central (every reward 0); three is the least that ranks.
DIRECT_MIN_GROUP = 3
DIRECT_GROUP_ERROR = (f"ppo.samples_per_prompt: must be >= {DIRECT_MIN_GROUP} for the direct-ranking variant "
                      "(str_direct), which ranks each prompt's rollout answers against each other (two answers are "
                      "always equally central); got {}")


# STR variants trained side by side from one sample stage (each gets ppo/<v>/, and reward/<v>/ when it
# has a reward model):
#   str           pairwise RM on the ranked (better, worse) pairs (the paper)
#   str_noise     as str, the RM also trained on perturbed losers (the paper's "+ noise")
#   str_listwise  Plackett-Luce RM on each group's whole ranked list
#   str_online    as str, the RM refreshed from ranked PPO rollouts during PPO
#   str_direct    no RM: PPO ranks each prompt's rollout answers itself (TextRank centrality over SBERT
#                 similarities) and rewards each answer with its centrality standardised within the group
VARIANTS = {
    "str": Variant("pairwise", use_noise=False, online_rm=False),
    "str_noise": Variant("pairwise", use_noise=True, online_rm=False),
    "str_listwise": Variant("listwise", use_noise=False, online_rm=False),
    "str_online": Variant("pairwise", use_noise=False, online_rm=True),
    "str_direct": Variant(None, use_noise=False, online_rm=False, reward_source="group_ranking"),
}


@dataclass
class SyntheticTaskConfig:
    """The offline embedded task (see train/data/synthetic.py): short, checkable answers, so that the
    agreement among samples correlates with correctness and the STR signal is real."""
    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 300
    seed: int = 1234
    # Share of training targets replaced by a wrong answer of the same type (see synthetic.add_label_noise):
    # noisy supervision is what sample agreement repairs, so the STR signal has something to fix.
    label_noise: float = 0.35
    # People in the task's fixed world (4 facts each): fewer people, more examples per fact.
    people: int = 12

    def __post_init__(self):
        for name in ("n_train", "n_validation", "n_test"):
            check_range(f"task.synthetic.{name}", getattr(self, name), 1)
        check_range("task.synthetic.label_noise", self.label_noise, 0.0, 0.9)
        check_range("task.synthetic.people", self.people, 2, 20)


PROMPT_STYLES = ("auto", "markers", "chat")


@dataclass
class PromptFormat:
    """How examples become prompts (train/data/prompts.py, the one place that formats them).

    ``style``: "markers" (the paper's ``<c> ... <q> ... <a>``, added as new tokens), "chat" (the
    tokenizer's chat template: dialogue turns as alternating user/assistant messages ending with a
    user turn, QA as one user message), or "auto": chat when the model is not the tiny one and its
    tokenizer has a chat template, else markers."""
    style: str = "auto"
    # The authors' notebook markers.
    context: str = "<c>"
    question: str = "<q>"
    answer: str = "<a>"
    # Dialogue: how many of the last context turns to keep (0 = all).
    max_context_turns: int = 3
    turn_separator: str = " "
    # Chat style: the system message (None: none, so the template decides; SmolLM2's then inserts its
    # own ~20-token default) and the instruction opening a QA user message.
    system: str | None = None
    qa_instruction: str = "Answer the question using the context."
    # Chat style: prompts are fitted to this many tokens by cutting the context (oldest dialogue turns
    # first, then the left of the oldest kept turn; the left of a QA passage), never the question or
    # the template. None: what leaves room for an answer in sft.block_size and reward.max_length.
    max_tokens: int | None = None

    def __post_init__(self):
        check_choice("task.prompt.style", self.style, PROMPT_STYLES)
        check_range("task.prompt.max_context_turns", self.max_context_turns, 0)
        if self.max_tokens is not None:
            check_range("task.prompt.max_tokens", self.max_tokens, 8)


# Which column of a data row holds each part of an example (train/data/rows.py). None: the default name.
# qa: id, title, context (the passage), question, answers (a list of strings, or SQuAD's {"text": [...]}),
# is_impossible. dialogue: turns (the context, a list of strings) and response; or messages (chat format:
# a list of {"role", "content"}, the last one the assistant's answer); or prompt (one string) and response.
QA_COLUMNS = ("id", "title", "context", "question", "answers", "is_impossible")
DIALOGUE_COLUMNS = ("turns", "response", "messages", "prompt")
COLUMN_DEFAULTS = {"id": "id", "title": "title", "context": "context", "question": "question",
                   "answers": "answers", "is_impossible": "is_impossible", "turns": "context",
                   "response": "response", "messages": "messages", "prompt": "prompt"}


@dataclass
class TaskColumns:
    """Column names of the task's rows, for data whose columns are named otherwise (None: the default,
    ``COLUMN_DEFAULTS``). A dialogue row's context is read from ``turns``, unless ``messages`` or
    ``prompt`` is set (one of the three)."""
    id: str | None = None
    title: str | None = None
    context: str | None = None
    question: str | None = None
    answers: str | None = None
    is_impossible: str | None = None
    turns: str | None = None
    response: str | None = None
    messages: str | None = None
    prompt: str | None = None

    def name(self, key: str) -> str:
        """The column that holds ``key``."""
        value = getattr(self, key)
        return COLUMN_DEFAULTS[key] if value is None else value

    def given(self) -> list[str]:
        return [key for key in COLUMN_DEFAULTS if getattr(self, key) is not None]

    def check(self, kind: str) -> None:
        for key in self.given():
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"task.columns.{key}: must be a non-empty column name, got {value!r}")
        own = {"qa": QA_COLUMNS, "dialogue": DIALOGUE_COLUMNS}.get(kind, ())
        for key in self.given():
            if key not in own:
                raise UserError(f"task.columns.{key}: not a column of task.kind {kind!r} (its columns: "
                                f"{', '.join(own) or 'none'})")
        sources = [key for key in ("turns", "messages", "prompt") if getattr(self, key) is not None]
        if len(sources) > 1:
            raise UserError(f"task.columns: give one of turns, messages or prompt (the dialogue's context), "
                            f"not {' and '.join(sources)}")
        if self.messages is not None and self.response is not None:
            raise UserError("task.columns.response: a messages row's response is its last (assistant) message")


@dataclass
class TaskConfig:
    kind: str = "synthetic"
    # Local .jsonl/.json/.parquet/.csv files or a hub dataset name (e.g. "rajpurkar/squad_v2"), read
    # with `datasets` (train/data/sources.py); never a dataset script (trust_remote_code is never set).
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    hub_config: str | None = None
    # A hub dataset's revision (branch, tag or commit); "refs/convert/parquet" reads the hub's Parquet
    # conversion of a script-based dataset.
    hub_revision: str | None = None
    columns: TaskColumns = field(default_factory=TaskColumns)
    max_train: int | None = None
    max_validation: int | None = None
    max_test: int | None = None
    # SQuAD v2 unanswerable questions are trained and scored against this string.
    unanswerable_target: str = "unanswerable"
    prompt: PromptFormat = field(default_factory=PromptFormat)
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)

    def __post_init__(self):
        check_choice("task.kind", self.kind, TASK_KINDS)
        if self.kind != "synthetic" and not self.train:
            raise UserError(f"task.train: required for task.kind {self.kind!r}")
        self.columns.check(self.kind)
        for name in ("max_train", "max_validation", "max_test"):
            if getattr(self, name) is not None:
                check_range(f"task.{name}", getattr(self, name), 1)


@dataclass
class TinyModelConfig:
    """A small GPT-2-shaped (or Llama-shaped) model built from a config, with a byte-level BPE tokenizer
    trained on the task's training text (the offline default: no weights can be fetched)."""
    # "llama": the pre-trained SmolLM2's architecture (RMSNorm, rotary positions, gated MLP, grouped
    # key/value heads, tied embeddings, no bias terms), for fast tests of that path.
    architecture: str = "gpt2"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 256
    vocab_size: int = 2000

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            check_range(f"model.tiny.{name}", getattr(self, name), 1)
        check_choice("model.tiny.architecture", self.architecture, ("gpt2", "llama"))
        check_range("model.tiny.vocab_size", self.vocab_size, 300)
        if self.n_embd % self.n_head:
            raise UserError(f"model.tiny.n_embd: must be divisible by n_head ({self.n_head}), got {self.n_embd}")


MIXED_PRECISIONS = ("no", "bf16", "fp16")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class ModelConfig:
    # "tiny", a hub name ("gpt2", "EleutherAI/gpt-neo-125m"), a local save_pretrained folder, a packaged
    # pre-trained model ("smollm2-135m-instruct") or a .gguf file (both converted once; train/models/pretrained.py).
    name: str = "tiny"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False
    # How weights are stored and loaded. Trained weights stay float32 (the master copy): in bfloat16,
    # 0.05 + 3e-5 == 0.05, so small updates would be lost (half weights are refused for training outside
    # DeepSpeed, whose optimizer keeps its own float32 copy). Half weights suit inference-only use.
    dtype: str = "float32"
    # How the model computes (train/precision.py): "bf16"/"fp16" run forwards under autocast with float32
    # master weights (DeepSpeed: its bf16/fp16 mode, switched on from this one setting); "no": float32.
    # The one source of truth: a launcher's --mixed_precision or a DeepSpeed JSON that says otherwise is refused.
    mixed_precision: str = "no"
    # Recompute activations in the backward pass instead of keeping them (less memory, ~1/3 more compute);
    # applied to every trained network (policy, reward model, critic). Off during generation.
    gradient_checkpointing: bool = False
    # Attention kernel: "sdpa" (torch's fused attention), "eager" (plain matmuls) or "flash_attention_2"
    # (needs the flash-attn package and a CUDA GPU; refused where it is not installed).
    attn_implementation: str = "sdpa"
    revision: str | None = None

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("model.attn_implementation", self.attn_implementation, ATTENTION_IMPLEMENTATIONS)
        if not isinstance(self.gradient_checkpointing, bool):
            raise UserError(f"model.gradient_checkpointing: expected true or false, got {self.gradient_checkpointing!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError("model.name: must be a non-empty string")


@dataclass
class SFTConfig:
    method: str = "full"
    lr: float = 1e-4  # paper
    batch_size: int = 32  # paper (effective)
    grad_accum: int = 1
    epochs: float = 1.0  # paper
    max_steps: int | None = None
    block_size: int = 128  # paper
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    adapter_size: int = 64
    # Ours: gradient-norm clipping (0 = off) and the checkpoint interval in optimizer steps for resume.
    max_grad_norm: float = 1.0
    save_every: int = 200
    # Extra methods trained as baselines next to the main one (rows of the report), for
    # ``baseline_max_steps`` steps each (None: as long as the main method).
    baselines: list[str] = field(default_factory=list)
    baseline_max_steps: int | None = None
    # Ours: a learning rate per method over ``lr`` (e.g. {full: 1.0e-4}): a method that trains every weight
    # and one that trains 0.1% of them rarely share their best rate.
    method_lr: dict[str, float] = field(default_factory=dict)
    # Ours: candidate learning rates, for every method (a list) or per method ({full: [...]}): a searched
    # method trains once per candidate and keeps the one with the lowest answer-token loss on the task's
    # validation split.
    lr_search: list[float] | dict[str, list[float]] = field(default_factory=list)

    def __post_init__(self):
        check_choice("sft.method", self.method, SFT_METHODS)
        for b in self.baselines:
            check_choice("sft.baselines[]", b, SFT_METHODS)
        check_range("sft.lr", self.lr, 0.0, low_open=True)
        check_range("sft.batch_size", self.batch_size, 1)
        check_range("sft.grad_accum", self.grad_accum, 1)
        check_range("sft.epochs", self.epochs, 0.0, low_open=True)
        for name in ("max_steps", "baseline_max_steps"):
            if getattr(self, name) is not None:
                check_range(f"sft.{name}", getattr(self, name), 1)
        check_range("sft.block_size", self.block_size, 8)
        check_range("sft.weight_decay", self.weight_decay, 0.0)
        check_range("sft.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("sft.lora_r", self.lora_r, 1)
        check_range("sft.adapter_size", self.adapter_size, 1)
        check_range("sft.max_grad_norm", self.max_grad_norm, 0.0)
        check_range("sft.save_every", self.save_every, 1)
        if not isinstance(self.method_lr, dict):
            raise UserError(f"sft.method_lr: expected a mapping of method to learning rate, got {self.method_lr!r}")
        for method, lr in self.method_lr.items():
            check_choice("sft.method_lr (key)", method, SFT_METHODS)
            check_range(f"sft.method_lr.{method}", lr, 0.0, low_open=True)
        if isinstance(self.lr_search, dict):
            searches = {f"sft.lr_search.{m}": rates for m, rates in self.lr_search.items()}
            for method in self.lr_search:
                check_choice("sft.lr_search (key)", method, SFT_METHODS)
        elif isinstance(self.lr_search, list):
            searches = {"sft.lr_search": self.lr_search}
        else:
            raise UserError(f"sft.lr_search: expected a list of learning rates or a mapping of method to such a "
                            f"list, got {self.lr_search!r}")
        for where, rates in searches.items():
            if not isinstance(rates, list):
                raise UserError(f"{where}: expected a list of learning rates, got {rates!r}")
            for lr in rates:
                check_range(f"{where}[]", lr, 0.0, low_open=True)
            if len(set(rates)) != len(rates):
                raise UserError(f"{where}: {rates} lists a learning rate twice")
        both = sorted(m for m in self.method_lr if self.candidates_for(m))
        if both:
            raise UserError(f"sft.method_lr and sft.lr_search both set the learning rate of {', '.join(both)}: "
                            "give one")

    def lr_for(self, method: str) -> float:
        """The learning rate ``method`` trains at without a search."""
        return self.method_lr.get(method, self.lr)

    def candidates_for(self, method: str) -> list[float]:
        """The learning rates ``sft.lr_search`` tries for ``method`` (none: it trains at :meth:`lr_for`)."""
        if isinstance(self.lr_search, dict):
            return list(self.lr_search.get(method, []))
        return list(self.lr_search)


@dataclass
class SampleConfig:
    samples_per_prompt: int = 8  # K, answers per prompt (paper: not given; its human study used 4)
    temperature: float = 0.8  # paper
    top_p: float = 0.95  # paper
    # Paper: < 100 (the default stays below); larger values are allowed: prompt + answer must fit the
    # model's context, so long prompts lose their oldest tokens (train/sampling/generation.prompt_budget).
    max_new_tokens: int = 64
    max_prompts: int | None = None
    batch_size: int = 16  # prompts per generate() call
    workers: int = 1  # CPU ranking workers per node (one pool per node, shared by its processes)
    # Rank through the async pool while generation continues; False ranks each batch inline.
    async_ranking: bool = True
    sampler: str = "shared_prefix"  # see SAMPLERS

    def __post_init__(self):
        check_choice("sample.sampler", self.sampler, SAMPLERS)
        check_range("sample.samples_per_prompt", self.samples_per_prompt, 2)
        check_range("sample.temperature", self.temperature, 0.0, low_open=True)
        check_range("sample.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("sample.max_new_tokens", self.max_new_tokens, 1)
        check_range("sample.batch_size", self.batch_size, 1)
        check_range("sample.workers", self.workers, 1)
        if self.max_prompts is not None:
            check_range("sample.max_prompts", self.max_prompts, 1)


@dataclass
class RewardConfig:
    # The loss follows the variant: pairwise -log sigmoid(r_w - r_l) (paper) for str / str_noise /
    # str_online, Plackett-Luce over the ranked list for str_listwise; str_direct trains no reward model.
    # "sft": the SFT model's weights as backbone; or a model name/folder.
    backbone: str = "sft"
    lr: float = 3e-5  # paper
    batch_size: int = 16  # paper
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 256  # paper
    heldout_fraction: float = 0.1  # of prompts, never seen in training
    normalize: bool = True  # gain/bias so SFT samples score mean 0, std 1
    save_every: int = 100  # steps between resumable checkpoints
    # A ready reward model instead of training one: a folder or hub name that
    # AutoModelForSequenceClassification loads with num_labels 1 (any selfrank reward/<variant>/model is
    # one). Every variant that needs a reward model then uses it (normalised as above when ``normalize``);
    # the settings above that train are unused. It must share the policy's tokenizer.
    model: str | None = None

    def __post_init__(self):
        check_range("reward.save_every", self.save_every, 1)
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise UserError("reward.model: must be a folder or hub name (or null to train one)")
        check_range("reward.lr", self.lr, 0.0, low_open=True)
        check_range("reward.batch_size", self.batch_size, 1)
        check_range("reward.epochs", self.epochs, 0.0, low_open=True)
        check_range("reward.max_length", self.max_length, 8)
        check_range("reward.heldout_fraction", self.heldout_fraction, 0.0, 0.9)
        if self.max_steps is not None:
            check_range("reward.max_steps", self.max_steps, 1)


@dataclass
class PPOConfig:
    steps: int = 100  # PPO iterations (each: one rollout batch + update epochs)
    batch_size: int = 16  # prompts per rollout (paper: 16)
    samples_per_prompt: int = 1
    lr: float = 3e-5  # paper (actor)
    critic_lr: float = 3e-5
    ppo_epochs: int = 4
    minibatches: int = 2
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.5  # paper's beta
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = -1.0
    temperature: float = 0.8  # sampling temperature; the log-probs are those of softmax(logits / T)
    top_p: float = 1.0
    max_new_tokens: int = 32
    max_grad_norm: float = 1.0
    # Learning-rate schedule over the PPO steps, for actor and critic alike: "constant" (paper), or
    # "linear" / "cosine" decay to 0 after ``warmup_steps`` steps of linear warm-up (train/optim.lr_factor).
    # A function of the step, so a resumed run continues it exactly; decaying schedules depend on
    # ``steps``, which then cannot change on resume.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # Beyond the paper: refresh the RM from ranked rollouts every N steps (0 = off).
    online_rm_every: int = 0
    online_rm_max_staleness: int = 2
    nan_policy: str = "skip"  # "skip" the step, or "stop" with a checkpoint
    save_every: int = 25
    # Placement of the frozen roles under DeepSpeed ZeRO-3: keep the reference policy's / reward
    # model's shards in CPU memory (they are only read once per rollout); ignored elsewhere.
    offload_reference: bool = False
    offload_reward: bool = False
    # ZeRO-3 rollouts: gather the actor's full weights on every rank for generate() (fast; one full
    # copy per rank) or keep them sharded and gather layer by layer per token (slow, low memory).
    gather_for_generation: bool = True
    # The actor's trainable weights: "full", or "lora" (peft adapters on every linear layer; the
    # reference policy is then the actor with its adapters switched off, so no second copy is held).
    policy: str = "full"
    lora_r: int = 8
    lora_alpha: int = 16
    # Where the rollout's actor log-probs come from: "sampling" (kept by the sampler while drawing: no
    # second actor forward), "forward" (recomputed by the update's own forward: the first ratio is
    # exactly 1), or "auto" (sampling for fp32 weights without autocast, forward otherwise).
    rollout_logprobs: str = "auto"
    sampler: str = "shared_prefix"  # see SAMPLERS
    # A prompts-only file (.jsonl/.json/.parquet/.csv: rows with a "prompt", or "messages" ending with a
    # user turn, or the task's own context columns) PPO draws its prompts from; None: the task's train split.
    prompts: str | None = None

    def __post_init__(self):
        check_choice("ppo.sampler", self.sampler, SAMPLERS)
        if self.prompts is not None and (not isinstance(self.prompts, str) or not self.prompts.strip()):
            raise UserError(f"ppo.prompts: must be a file path, got {self.prompts!r}")
        check_choice("ppo.policy", self.policy, ("full", "lora"))
        check_choice("ppo.rollout_logprobs", self.rollout_logprobs, ("auto", "sampling", "forward"))
        check_choice("ppo.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("ppo.warmup_steps", self.warmup_steps, 0)
        for name in ("steps", "batch_size", "samples_per_prompt", "ppo_epochs", "minibatches", "max_new_tokens",
                     "save_every", "lora_r", "lora_alpha"):
            check_range(f"ppo.{name}", getattr(self, name), 1)
        for name in ("lr", "critic_lr"):
            check_range(f"ppo.{name}", getattr(self, name), 0.0, low_open=True)
        check_range("ppo.clip_range", self.clip_range, 0.0, low_open=True)
        check_range("ppo.value_clip", self.value_clip, 0.0, low_open=True)
        check_range("ppo.kl_coef", self.kl_coef, 0.0)
        check_range("ppo.gamma", self.gamma, 0.0, 1.0)
        check_range("ppo.lam", self.lam, 0.0, 1.0)
        check_range("ppo.temperature", self.temperature, 0.0, low_open=True)
        check_range("ppo.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("ppo.online_rm_every", self.online_rm_every, 0)
        check_choice("ppo.nan_policy", self.nan_policy, ("skip", "stop"))
        if (self.batch_size * self.samples_per_prompt) % self.minibatches:
            raise UserError("ppo.minibatches: must divide batch_size * samples_per_prompt")


@dataclass
class EvalConfig:
    max_examples: int | None = 300
    max_new_tokens: int = 32
    # Decoding for the scored answers: the paper's sampling settings by default (seeded), or greedy.
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    # Sampled answers per test prompt; each example's score is the mean over them. More samples shrink
    # the decoding noise in the CIs (which resample prompts); with greedy decoding keep 1.
    samples_per_prompt: int = 1
    batch_size: int = 32
    bootstrap: int = 1000
    confidence: float = 0.95
    # Ranking agreement study: groups of this many answers.
    agreement_group_size: int = 4
    agreement_groups: int = 100
    seed: int = 0
    sampler: str = "shared_prefix"  # see SAMPLERS
    # Control rows from the SFT model (train/evaluation/controls.py): greedy decoding, and majority vote
    # over this many answers sampled as the sample stage samples (None: sample.samples_per_prompt, the
    # K of STR's groups), so that a gain of STR over SFT can be told from "sampling got greedier".
    controls: bool = True
    majority_samples: int | None = None

    def __post_init__(self):
        check_choice("eval.sampler", self.sampler, SAMPLERS)
        if self.max_examples is not None:
            check_range("eval.max_examples", self.max_examples, 1)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        check_range("eval.bootstrap", self.bootstrap, 10)
        check_range("eval.temperature", self.temperature, 0.0, low_open=True)
        check_range("eval.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("eval.batch_size", self.batch_size, 1)
        check_range("eval.samples_per_prompt", self.samples_per_prompt, 1)
        if not self.do_sample and self.samples_per_prompt > 1:
            raise UserError("eval.samples_per_prompt: greedy decoding (do_sample: false) gives one answer; use 1")
        check_range("eval.confidence", self.confidence, 0.5, 1.0, high_open=True)
        check_range("eval.agreement_group_size", self.agreement_group_size, 2, 8)
        check_range("eval.agreement_groups", self.agreement_groups, 0)
        if self.majority_samples is not None:
            check_range("eval.majority_samples", self.majority_samples, 2)


@dataclass
class TrackingConfig:
    # "disabled" (default), "offline" (runs/<name>/wandb/, upload later with `wandb sync`), or "online"
    # (needs W&B credentials as wandb finds them: `wandb login` or WANDB_API_KEY; else it logs offline).
    wandb: str = "disabled"
    project: str = "selfrank"
    entity: str | None = None

    def __post_init__(self):
        check_choice("tracking.wandb", self.wandb, ("offline", "online", "disabled"))


@dataclass
class ExperimentConfig:
    name: str = "demo"
    seed: int = 0
    output_dir: str = "runs"
    torch_threads: int | None = None  # intra-op threads of the trainer process (None: torch's default)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    variants: list[str] = field(default_factory=lambda: ["str", "str_noise"])

    def __post_init__(self):
        import re
        if self.torch_threads is not None:
            check_range("torch_threads", self.torch_threads, 1)
        if not self.variants:
            raise UserError("variants: name at least one of " + ", ".join(VARIANTS))
        for v in self.variants:
            check_choice("variants[]", v, VARIANTS)
        if "str_online" in self.variants and self.ppo.online_rm_every < 1:
            raise UserError("ppo.online_rm_every: must be >= 1 for the online reward-model variant (str_online)")
        if "str_online" in self.variants and self.ppo.samples_per_prompt < 2:
            raise UserError("ppo.samples_per_prompt: must be >= 2 for the online reward-model variant (str_online): "
                            "it ranks each prompt's rollout answers against each other")
        if "str_direct" in self.variants and self.ppo.samples_per_prompt < DIRECT_MIN_GROUP:
            raise UserError(DIRECT_GROUP_ERROR.format(self.ppo.samples_per_prompt))
        interval = self.ranking.pairs.interval
        if interval is not None and interval >= self.sample.samples_per_prompt:
            raise UserError(f"ranking.pairs.interval: IL must be < sample.samples_per_prompt "
                            f"({self.sample.samples_per_prompt}), got {interval}")
        if self.model.name == "tiny":
            # The tiny model's context is known now: refuse an answer length that leaves no room for a prompt.
            context = self.model.tiny.n_positions
            for name, value in (("sample.max_new_tokens", self.sample.max_new_tokens),
                                ("ppo.max_new_tokens", self.ppo.max_new_tokens),
                                ("eval.max_new_tokens", self.eval.max_new_tokens)):
                if value >= context:
                    raise UserError(f"{name}: {value} leaves no room for the prompt in the {context}-token tiny "
                                    f"model (model.tiny.n_positions); use fewer tokens or a longer context")
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.name):
            raise UserError(f"name: letters, digits, '.', '_' and '-' only (it names the run folder); got {self.name!r}")
