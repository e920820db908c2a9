"""The demo model's text: CPython's standard library sources, shipped with moegen.

The corpus is the source of every public top-level pure-Python module of the standard library
(``Lib/NAME.py`` with NAME not starting with ``_``; packages, tests and the ROT13-encoded
``this.py`` left out), in sorted order, each after a ``# Lib/NAME.py`` line. Every tenth module
in that order (the 10th, 20th, ...) is held out for evaluation; the others are the training
text. Splitting by module keeps the held-out text unseen, not merely unseen bytes of a file
that was trained on.

The two parts are committed, xz-compressed, in ``corpus/`` so training and evaluation are the
same on every machine whatever its Python; ``corpus/README.md`` records the Python they were
built from and their license (the PSF License, whose text lies beside them).
``python -m moegen.host.demo.corpus`` rebuilds them from the running interpreter's library.
"""

import argparse
import lzma
import sysconfig
from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["HELDOUT_EVERY", "build", "heldout", "training_text", "write"]

HELDOUT_EVERY = 10
_FILES = {"train": "train.txt.xz", "heldout": "heldout.txt.xz"}


def build(stdlib=None):
    """The corpus parts ``(train, heldout)`` as bytes, built from the library at ``stdlib``
    (default: the running interpreter's)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    modules = sorted(path for path in root.glob("*.py") if not path.name.startswith("_") and path.name != "this.py")
    if len(modules) < HELDOUT_EVERY:
        raise ValueError(f"{root} holds {len(modules)} public modules, too few for a corpus")
    parts = {"train": [], "heldout": []}
    for index, path in enumerate(modules, start=1):
        part = "heldout" if index % HELDOUT_EVERY == 0 else "train"
        parts[part].append(f"# Lib/{path.name}\n".encode() + path.read_bytes())
    return b"\n".join(parts["train"]), b"\n".join(parts["heldout"])


def write(out, stdlib=None):
    """Build the corpus and write its xz-compressed parts into the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in zip(_FILES, build(stdlib), strict=True):
        (out / _FILES[name]).write_bytes(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME))


@cache
def _part(name):
    return lzma.decompress(resources.files(__package__).joinpath("corpus", _FILES[name]).read_bytes())


def training_text():
    """The training part of the shipped corpus, as bytes."""
    return _part("train")


def heldout(nbytes=None):
    """The held-out part of the shipped corpus, or its first ``nbytes`` bytes."""
    text = _part("heldout")
    if nbytes is None:
        return text
    if not 0 < nbytes <= len(text):
        raise ValueError(f"nbytes must be in 1..{len(text)}, not {nbytes!r}")
    return text[:nbytes]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moegen.host.demo.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", help="the standard library folder to read (default: this interpreter's)")
    parser.add_argument("--out", default=Path(__file__).parent / "corpus", type=Path,
                        help="folder for train.txt.xz and heldout.txt.xz (default: the package's corpus/)")
    args = parser.parse_args(argv)
    write(args.out, args.stdlib)
    for name, file in _FILES.items():
        path = args.out / file
        size = len(lzma.decompress(path.read_bytes()))
        print(f"{path}: {size} bytes of {name} text, {path.stat().st_size} compressed")


if __name__ == "__main__":
    main()
