"""Real local data: Wikipedia articles, polarity and analogies from gensim's test data, images, digits.

Loaders never download: a missing package or folder raises S2DError naming the install command.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from s2d.errors import S2DError

GENSIM_INSTALL = "pip install 'gensim>=4.4,<4.5'"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 500
SPLITS = ("train", "validation", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"

DATASETS = {
    "wiki": "105 English Wikipedia articles (gensim test data), split by article into train/validation/test",
    "polarity": "200 movie-review sentences, 100 positive and 100 negative (Pang & Lee, gensim test data)",
    "analogies": "19,544 word-analogy questions in 14 sections (gensim test data)",
    "fashion-mnist": "60k/10k 28x28 clothing images in 10 classes (Debian dataset-fashion-mnist, or a folder)",
    "digits": "1,797 8x8 digit images (scikit-learn)",
}


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def _gensim_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise S2DError(f"the gensim package holds the text data and is not installed: run `{GENSIM_INSTALL}`")
    path = Path(spec.origin).parent / "test" / "test_data" / name
    if not path.is_file():
        raise S2DError(f"{name} is missing from gensim's test data at {path.parent}: run `{GENSIM_INSTALL}`")
    return path


def _clean_wikitext(text: str) -> str:
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@lru_cache(maxsize=1)
def _all_articles() -> tuple[Article, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_data(WIKI_FILE)) as fh:
        for title, raw, _ in extract_pages(fh):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wikitext(filter_wiki(raw))
            if len(text) >= WIKI_MIN_CHARS:
                articles.append(Article(title, text))
    if not articles:
        raise S2DError(f"no articles could be read from {WIKI_FILE}; reinstall gensim: `{GENSIM_INSTALL}`")
    return tuple(articles)


def load_wiki(split: str = "train") -> list[Article]:
    """Articles of one split. The split is by article: ordered by a hash of the title, 80/10/10."""
    if split not in SPLITS:
        raise S2DError(f"unknown wiki split {split!r}; use one of {', '.join(SPLITS)}")
    ordered = sorted(_all_articles(), key=lambda a: hashlib.sha256(a.title.encode()).hexdigest())
    n = len(ordered)
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    lo, hi = bounds[split]
    return ordered[lo:hi]


def wiki_text(split: str = "train") -> str:
    """One string of a split's articles, separated by blank lines."""
    return "\n\n".join(a.text for a in load_wiki(split))


def wiki_tokens(tokenizer, split: str = "train") -> torch.Tensor:
    """Token ids of a wiki split, articles tokenized one by one and joined by blank lines (cached)."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__, split)
    if key not in _TOKEN_CACHE:
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for i, article in enumerate(load_wiki(split)):
            ids += (sep if i else []) + tokenizer(article.text, add_special_tokens=False, verbose=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def load_polarity() -> list[tuple[str, int]]:
    """(sentence, label) pairs; label 1 is positive, 0 negative."""
    rows = []
    for line in _gensim_data("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            rows.append((text.strip(), int(label == "__label__pos")))
    return rows


def load_analogies() -> list[tuple[str, str, str, str, str]]:
    """(section, a, b, c, d) rows: a is to b as c is to d."""
    rows, section = [], ""
    for line in _gensim_data("questions-words.txt").read_text().splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif line.strip():
            a, b, c, d = line.split()
            rows.append((section, a, b, c, d))
    return rows


def _read_idx(path: Path) -> np.ndarray:
    # IDX is four lines of struct parsing; no maintained library reads it without torchvision.
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise S2DError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise S2DError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def load_fashion_mnist(split: str = "train", folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N×28×28, labels int64) from the Debian package's folder or `folder`."""
    if split not in ("train", "test"):
        raise S2DError(f"fashion-mnist has splits train and test, not {split!r}")
    root = Path(folder) if folder is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise S2DError(f"fashion-mnist is not at {root}: run `{FASHION_MNIST_INSTALL}` (as root), or pass the "
                       "folder that holds the IDX .gz files")
    return torch.from_numpy(_read_idx(images).copy()), torch.from_numpy(_read_idx(labels).astype(np.int64))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 N×8×8 in [0, 16], labels int64) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise S2DError("digits come from scikit-learn: run `pip install scikit-learn`") from err
    bunch = sk_digits()
    return torch.tensor(bunch.images, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.int64)


IMAGE_SETS = ("fashion-mnist", "digits")


def image_split(name: str, split: str, folder: str | Path | None = None, seed: int = 0):
    """(images, labels) of one split, grey images N×H×W in [0, 1]: Fashion-MNIST's own split (only that split's
    files are read), or digits split 80/20 in a seeded order (scikit-learn ships no split). One function, so that
    fine-tuning, calibration and evaluation always see the same split of the same images."""
    if split not in ("train", "test"):
        raise S2DError(f"image data has splits train and test, not {split!r}")
    if name == "digits":
        images, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(labels))
        order = order[:cut] if split == "train" else order[cut:]
        return images[order] / 16.0, labels[order]
    if name == "fashion-mnist":
        x, y = load_fashion_mnist(split, folder)
        return x.float() / 255, y
    raise S2DError(f"unknown image data {name!r}; use one of {', '.join(IMAGE_SETS)}")


def model_pixels(model, images: torch.Tensor) -> torch.Tensor:
    """Grey images N×H×W in [0, 1] as `model`'s pixel_values (its config's image_size and num_channels)."""
    config = model.config
    if getattr(config, "image_size", None) is None:
        raise S2DError(f"{type(model).__name__} has no image_size in its config: image data needs a vision model")
    return pixel_values(images, int(config.image_size), int(getattr(config, "num_channels", 1)))


def seeded_train_images(images: str, start: int, count: int, folder: str | Path | None = None, seed: int = 0):
    """(images, labels): positions start..start+count of the set's train split in one seeded order. Calibration
    takes the first n_samples; the image rank search the ones after, so the two never share an image."""
    train, labels = image_split(images, "train", folder, seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[start: start + count]
    return train[order], labels[order]


def calibration_images(model, images: str, n_samples: int, folder: str | Path | None = None, seed: int = 0) -> dict:
    """`n_samples` seeded train images of the set `images` as the model's pixel_values (never test images)."""
    if n_samples < 1:
        raise S2DError(f"n_samples must be ≥ 1, got {n_samples}")
    return {"pixel_values": model_pixels(model, seeded_train_images(images, 0, n_samples, folder, seed)[0])}


def calibration_batch(tokenizer, texts: str | list[str], n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """A seeded `n_samples × seq_len` batch of token ids, windows drawn at random from `texts`."""
    if n_samples <= 0 or seq_len <= 0:
        raise S2DError(f"n_samples and seq_len must be positive (got {n_samples} and {seq_len})")
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    if not text.strip():
        raise S2DError("the calibration text is empty: give at least one non-empty document")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise S2DError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                       "give more text or a shorter --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def pixel_values(images: torch.Tensor, size: int, channels: int = 1) -> torch.Tensor:
    """Grey images N×H×W in [0, 1] as a ViT's `pixel_values`: resized to `size`, centred to [-1, 1]."""
    import torch.nn.functional as F

    x = images.float().unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, channels, -1, -1)
