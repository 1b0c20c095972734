"""Zero-shot multiple-choice tasks built deterministically from the real local data (see docs/tasks.md).

No standard benchmark ships offline, so the tasks are built from gensim's test data. The only text not
taken from the data is each task's short fixed prompt template. Every task carries a version string:
change the construction, bump the version.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from s2d.errors import S2DError
from s2d.eval.multiple_choice import MCExample

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Task:
    name: str
    version: str
    description: str
    examples: tuple[MCExample, ...]

    def __len__(self) -> int:
        return len(self.examples)


def _rng(task: str, seed: int) -> random.Random:
    # A string seed goes through SHA-512 in random.seed, so the stream is the same on every platform.
    return random.Random(f"s2d-eval:{task}:{seed}")


def _limited(examples: list[MCExample], limit: int | None) -> tuple[MCExample, ...]:
    if limit is not None and limit < 1:
        raise S2DError(f"--limit must be at least 1, got {limit}")
    return tuple(examples[:limit] if limit is not None else examples)


# -- analogy-mc -----------------------------------------------------------------------------------------------

ANALOGY_TEMPLATE = "{a} is to {b} as {c} is to"
ANALOGY_PER_SECTION = 72  # x 14 sections = 1,008 questions


def analogy_mc(seed: int = DEFAULT_SEED, limit: int | None = None) -> Task:
    """'A is to B as C is to' with the true D and 3 other answers of the same section, 72 per section."""
    from s2d.assets import load_analogies

    rows = load_analogies()
    rng = _rng("analogy-mc", seed)
    by_section: dict[str, list[tuple[str, str, str, str]]] = {}
    for section, a, b, c, d in rows:
        by_section.setdefault(section, []).append((a, b, c, d))
    examples = []
    for section in sorted(by_section):
        questions = by_section[section]
        answers = sorted({q[3] for q in questions})
        for a, b, c, d in rng.sample(questions, min(ANALOGY_PER_SECTION, len(questions))):
            taken = {w.lower() for w in (a, b, c, d)}
            pool = [w for w in answers if w.lower() not in taken]
            options = rng.sample(pool, 3) + [d]
            rng.shuffle(options)
            examples.append(MCExample(ANALOGY_TEMPLATE.format(a=a, b=b, c=c), tuple(options), options.index(d)))
    rng.shuffle(examples)
    return Task("analogy-mc", "analogy-mc/1", "word analogies (gensim questions-words), 4 options from the same "
                "section, 72 questions per section", _limited(examples, limit))


# -- polarity -------------------------------------------------------------------------------------------------

POLARITY_TEMPLATE = "Review: {sentence}\nSentiment:"
POLARITY_CHOICES = ("negative", "positive")  # index = label (1 is positive)


def polarity(seed: int = DEFAULT_SEED, limit: int | None = None) -> Task:
    """All 200 movie-review sentences (Pang & Lee), in seeded order; options ' negative' / ' positive'."""
    from s2d.assets import load_polarity

    rows = load_polarity()
    examples = [MCExample(POLARITY_TEMPLATE.format(sentence=s), POLARITY_CHOICES, label) for s, label in rows]
    _rng("polarity", seed).shuffle(examples)
    return Task("polarity", "polarity/1", "movie-review sentence polarity (Pang & Lee, gensim), 2 options",
                _limited(examples, limit))


# -- wiki-cloze -----------------------------------------------------------------------------------------------

CLOZE_SPLIT = "test"
CLOZE_MAX_EXAMPLES = 500
CLOZE_MIN_WORDS, CLOZE_MAX_WORDS = 8, 60
_WORD = re.compile(r"\b[a-z]{4,}\b")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_TARGET = re.compile(r"^(?P<head>.*\S)\s(?P<word>[a-z]{4,})\.$", re.S)
_MARKUP = re.compile(r"[|{}\[\]<>=*#_]")


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs: no headings, lists, tables or leftover markup."""
    out = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if para and not _MARKUP.search(para) and len(para) >= 80:
            out.append(para)
    return out


def wiki_cloze(seed: int = DEFAULT_SEED, limit: int | None = None) -> Task:
    """Last word of held-out (test-split) Wikipedia sentences; the previous sentence of the paragraph is context.

    Distractors come from the same article: lowercase words that share the answer's last two letters (a crude
    part-of-speech proxy: -ed, -ly, -ng, -es ...) where possible, then nearest in frequency over the test split.
    """
    from s2d.assets import load_wiki

    articles = load_wiki(CLOZE_SPLIT)
    freq = Counter(w for a in articles for w in _WORD.findall(a.text))
    rng = _rng("wiki-cloze", seed)
    examples = []
    for article in articles:
        vocab = sorted(set(_WORD.findall(article.text)))
        for para in _paragraphs(article.text):
            sentences = _sentences(para)
            for i, sentence in enumerate(sentences):
                match = _TARGET.match(sentence)
                n_words = len(sentence.split())
                if not match or not CLOZE_MIN_WORDS <= n_words <= CLOZE_MAX_WORDS:
                    continue
                word = match["word"]
                context = (sentences[i - 1] + " " if i else "") + match["head"]
                ranked = sorted((w for w in vocab if w != word),
                                key=lambda w, word=word: (w[-2:] != word[-2:], abs(math.log(freq[w] / freq[word])),
                                               rng.random()))
                if len(ranked) < 3:
                    continue
                options = ranked[:3] + [word]
                rng.shuffle(options)
                examples.append(MCExample(context, tuple(options), options.index(word)))
    rng.shuffle(examples)
    return Task("wiki-cloze", "wiki-cloze/1", f"last word of held-out Wikipedia sentences ({CLOZE_SPLIT} split), 4 "
                "options from the same article", _limited(examples[:CLOZE_MAX_EXAMPLES], limit))


TASKS: dict[str, Callable[..., Task]] = {"analogy-mc": analogy_mc, "polarity": polarity, "wiki-cloze": wiki_cloze}


def split_task(task: Task, fraction: float) -> tuple[Task, Task]:
    """(search split, report split) of a task: every (1/fraction)-th example searches, the rest report.

    Evenly spaced rather than the first examples, so a task built section by section (analogy-mc) puts every
    section in both splits. The same (task, fraction) always gives the same disjoint splits.
    """
    if not 0 < fraction < 1:
        raise S2DError(f"the search fraction must be in (0, 1), got {fraction}")
    n = len(task.examples)
    picked = {int(k / fraction) for k in range(math.ceil(n * fraction))} & set(range(n))
    search = tuple(ex for i, ex in enumerate(task.examples) if i in picked)
    report = tuple(ex for i, ex in enumerate(task.examples) if i not in picked)
    if not search or not report:
        raise S2DError(f"{task.name} has {n} examples, too few to split {fraction:.0%} off for a search")
    return (Task(task.name, task.version, f"{task.description}; search split ({len(search)})", search),
            Task(task.name, task.version, f"{task.description}; report split ({len(report)})", report))


def build_task(name: str, seed: int = DEFAULT_SEED, limit: int | None = None) -> Task:
    """Build a task by name; the same (name, seed, limit) always gives the same examples."""
    if name not in TASKS:
        raise S2DError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (and ppl:wiki for perplexity)")
    return TASKS[name](seed=seed, limit=limit)
