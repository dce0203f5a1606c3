"""Make WordNet 3.0 available to NLTK offline, for METEOR.

``nltk.download`` needs the internet. Debian's ``wordnet-base`` + ``wordnet-sense-index`` hold the
same WordNet 3.0 database that NLTK ships; NLTK additionally wants a ``lexnames`` file, which we
generate from the ``lexnames(5WN)`` man page inside wordnet-base. The result is a folder
``<dest>/corpora/wordnet``.

By default ``dest`` is ``<sys.prefix>/share/nltk_data``: a folder NLTK always searches, so every
``selfrank`` command of this environment finds WordNet from any directory, in a Slurm job too, with
no variable to set. ``NLTK_DATA`` still takes precedence when set.

Usage: python -m selfrank.launch.setup_wordnet [DEST]   (installs the Debian packages if missing and root)
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
PACKAGES = ("wordnet-base", "wordnet-sense-index")
NEEDED = ("data.noun", "index.noun", "index.sense", "noun.exc", "adj.exc", "verb.exc", "adv.exc")
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_from_man(text: str) -> str:
    """The 45 ``NN<TAB>name<TAB>category`` lines, parsed from the man page's table."""
    lines = []
    for match in re.finditer(r"^(\d\d)\t((noun|verb|adj|adv)\.\w+)", text, flags=re.M):
        lines.append(f"{match.group(1)}\t{match.group(2)}\t{CATEGORY[match.group(3)]}")
    if len(lines) != 45:
        raise RuntimeError(f"expected 45 lexicographer files in {LEXNAMES_MAN}, found {len(lines)}")
    return "\n".join(lines) + "\n"


def _install_packages() -> None:
    if all((WORDNET_DIR / name).exists() for name in NEEDED) and LEXNAMES_MAN.exists():
        return
    if os.geteuid() != 0:
        raise SystemExit(f"WordNet is missing: install the Debian packages {' '.join(PACKAGES)} (needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env)


def build(dest: Path) -> Path:
    _install_packages()
    target = dest / "corpora" / "wordnet"
    if (target / "lexnames").exists() and (target / "index.sense").exists():
        return target
    staging = dest / "corpora" / ".wordnet.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in WORDNET_DIR.iterdir():
        if item.is_file():
            shutil.copy2(item, staging / item.name)
    (staging / "lexnames").write_text(lexnames_from_man(gzip.open(LEXNAMES_MAN, "rt").read()))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # appears whole or not at all
    return target


def main(argv: list[str]) -> int:
    from selfrank.train.evaluation.metrics import wordnet_home

    dest = Path(argv[1] if len(argv) > 1 else wordnet_home()).resolve()
    target = build(dest)
    import nltk

    if str(dest) not in nltk.data.path:
        nltk.data.path.insert(0, str(dest))
    from nltk.corpus import wordnet

    synsets = len(wordnet.synsets("dog"))
    if synsets == 0:
        raise SystemExit(f"WordNet at {target} loaded but knows no 'dog'")
    print(f"WordNet 3.0 ready at {target} ({synsets} synsets for 'dog')")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
