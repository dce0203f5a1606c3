"""The reward model as a Hugging Face sequence classifier (``AutoModelForSequenceClassification``, one label).

Every reward-model folder this project writes is also such a classifier folder
(``GPT2ForSequenceClassification``, ``LlamaForSequenceClassification``...): ``config.json`` names the
classifier class with ``num_labels`` 1 and ``pad_token_id``, ``model.safetensors`` holds the backbone
under the class's prefix (``transformer.``, ``model.``) and the ``score`` head, and the tokenizer sits
beside them (saved with right padding). So::

    AutoModelForSequenceClassification.from_pretrained(folder)(input_ids, attention_mask).logits[:, 0]

scores as :func:`train.models.reward_model.score` does, on the same token ids (prompt, response, end of
turn), right-padded: the classifier reads the rightmost non-pad token, which is the last real one since
the pad token is never the end-of-turn token here, and positions count from 0 on the left as
``position_ids_from_mask`` makes them for any padding.

The normaliser's gain is folded into ``score.weight``. An additive constant cannot be: the classifier's
head has no bias (nor does, for Llama-type models, the final norm). It is written as ``reward_offset`` in
``config.json``: ``logits + config.reward_offset`` is exactly selfrank's normalised reward. Pairwise
(Bradley-Terry) comparisons, group-relative or whitened rewards do not need it.

Import (``reward.model``): any folder or hub name that ``AutoModelForSequenceClassification`` loads
with one label becomes a :class:`RewardModel` (its base model as backbone, ``score`` as head, its
``reward_offset`` if any as the normaliser's bias). Remote code is never trusted.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from selfrank.errors import UserError

OFFSET_KEY = "reward_offset"


def _classifier_class(config):
    """The ``*ForSequenceClassification`` class of ``config``'s architecture (one of transformers')."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(getattr(config, "model_type", None))
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UserError(f"reward model: transformers has no sequence classifier for model type "
                        f"{getattr(config, 'model_type', None)!r}")
    return cls


def classifier_offset(rm) -> float:
    """The constant the classifier's logits lack: ``gain * head.bias + bias``."""
    return float(rm.gain) * float(rm.head.bias.detach().float().reshape(-1)[0]) + float(rm.bias)


def save_classifier(rm, folder: Path) -> None:
    """Write ``rm``'s backbone and folded head to ``folder`` as a one-label sequence classifier
    (safetensors, ``config.json``); the caller writes the tokenizer and its own files."""
    cls = _classifier_class(rm.backbone.config)
    prefix = cls.base_model_prefix
    state = {f"{prefix}.{name}": tensor for name, tensor in rm.backbone.state_dict().items()}
    weight = rm.head.weight.detach().float() * float(rm.gain)
    state["score.weight"] = weight.to(rm.head.weight.dtype).contiguous()
    # The backbone's own save_pretrained writes the weights (safetensors, sharded when large); the
    # classifier's config then replaces the backbone's.
    rm.backbone.save_pretrained(folder, state_dict=state)
    config = copy.deepcopy(rm.backbone.config)
    config.architectures = [cls.__name__]
    config.num_labels = 1
    pad = getattr(rm.tokenizer, "pad_token_id", None)
    if pad is not None:
        config.pad_token_id = pad
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.pad_token_id = pad
    setattr(config, OFFSET_KEY, classifier_offset(rm))
    config.save_pretrained(folder)


def is_classifier_folder(folder: Path) -> bool:
    """Whether ``folder/config.json`` names a sequence-classifier class (the current layout)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def _label_count(config: dict) -> int:
    """``num_labels`` as transformers derives it from a config.json (id2label wins; default 2)."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def check_classifier_source(name: str, field: str = "reward.model") -> None:
    """Cheap check that ``name`` is a one-label sequence classifier (reads config.json only): a local
    folder, or a hub name found offline in the cache / online."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"{field}: {name} is not a model folder (no config.json)")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=False).to_dict()
        except (OSError, ValueError) as err:
            raise UserError(f"{field}: {name} is neither a local folder nor a loadable hub model "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    labels = _label_count(config)
    if labels != 1:
        raise UserError(f"{field}: {name} has num_labels {labels}; a reward model has exactly one "
                        "(AutoModelForSequenceClassification with num_labels=1)")


def reward_model_from_classifier(name: str, model_cfg=None):
    """A :class:`RewardModel` from a one-label ``AutoModelForSequenceClassification`` folder or hub name
    (trust_remote_code off): its base model, its ``score`` head, ``reward_offset`` as the bias."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from selfrank.train.models.reward_model import RewardModel

    check_classifier_source(name)
    kwargs = {"trust_remote_code": False}
    if model_cfg is not None:
        kwargs["dtype"] = getattr(torch, model_cfg.dtype)
    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"reward.model: {name}: cannot load it as AutoModelForSequenceClassification "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    head = getattr(classifier, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise UserError(f"reward.model: {name}: {type(classifier).__name__} has no one-output `score` head")
    backbone = classifier.base_model
    rm = RewardModel(backbone, tokenizer=tokenizer, source=name)
    with torch.no_grad():
        rm.head.weight.copy_(head.weight.float())
        rm.head.bias.copy_(head.bias.float() if head.bias is not None else torch.zeros(1))
    rm.set_normalizer(1.0, float(getattr(classifier.config, OFFSET_KEY, 0.0) or 0.0))
    rm.eval()
    return rm
