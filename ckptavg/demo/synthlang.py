"""Critter: a small synthetic language, written for ckptavg's demo and tests (no text from elsewhere).

A seeded *world* of invented creatures, each with a fixed colour, home, food and friend, is talked
about in a few dozen sentence templates (singular and plural agreement, questions and answers,
pronouns), mixed with small sums written in words. A tiny model first learns the grammar (loss
falls fast), then memorises the world's facts and the addition table one by one, so its held-out
loss keeps falling for hundreds of steps: enough road for checkpoint averaging to show something.

Everything is a pure function of the seed (Python's ``random.Random``, no global state):

- :func:`world` — the creatures and their facts;
- :func:`corpus` — training documents, held-out documents (disjoint from training, as whole
  documents) and a zero-shot multiple-choice task in the same language;
- :func:`train_tokenizer` — a byte-level BPE tokenizer (as Pythia's) trained locally with
  ``tokenizers`` on the training documents, wrapped for ``AutoTokenizer``;
- :func:`write_task` / :func:`write_jsonl` — the task as an lm-eval YAML (``dataset_path: json``
  with local ``data_files``) and JSONL files.

    >>> c = corpus(seed=0)
    >>> c.train[0]
    'the repe is a friend of the grube . it is red . it eats berries . the red repe sees a blue grube .'
    >>> c.task[0]
    {'id': 0, 'kind': 'food', 'question': 'what does the zoze eat ?', 'choices': ['berries', 'leaves', 'fish', 'grass'], 'label': 2}
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when any change below alters the generated text: cached runs are keyed by it.
GENERATOR_VERSION = 1

EOS = "<|endoftext|>"  # Pythia's end-of-text token, id 0
PAD = "<|padding|>"  # Pythia's padding token, id 1
# Everything :func:`train_tokenizer` decides besides the texts and the vocabulary size: part of the
# demo run's cache key, so a change here retrains rather than reusing a run with another tokenizer.
TOKENIZER_SETTINGS: dict[str, Any] = {
    "model": "bpe", "byte_level": True, "add_prefix_space": False, "trim_offsets": False,
    "special_tokens": [EOS, PAD], "bos": EOS, "eos": EOS, "unk": EOS, "pad": PAD, "model_max_length": 2048,
    "clean_up_tokenization_spaces": False,
}

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "brown")
HOMES = ("marsh", "forest", "cave", "river", "hill", "desert", "meadow", "lake")
FOODS = ("seeds", "fish", "berries", "grass", "insects", "roots", "leaves", "honey")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
_WORDS = ("the", "is", "lives", "live", "in", "eats", "eat", "a", "friend", "friends", "of", "where", "does",
          "what", "colour", "it", "are", "many", "and", "meet", "sees", "plus", "minus")  # never a name
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gr", "tr", "sk")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "l", "k", "m")


@dataclass(frozen=True)
class Creature:
    """One kind of creature and its facts; ``friend`` names another creature."""

    name: str
    colour: str
    home: str
    food: str
    friend: str


@dataclass(frozen=True)
class Corpus:
    """Documents of the language and a zero-shot task.

    ``train`` and ``heldout`` share no document; ``task`` items are
    ``{"id", "kind", "question", "choices", "label"}`` (lm-eval multiple choice).
    """

    world: tuple[Creature, ...]
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    task: tuple[dict[str, Any], ...]


def world(seed: int = 0, n_creatures: int = 32) -> tuple[Creature, ...]:
    """The creatures of the world for ``seed``: invented names (two syllables), facts drawn uniformly.

    Example:
        >>> [c.name for c in world(0, 3)]
        ['zoze', 'broken', 'gukom']
    """
    rng = random.Random(f"ckptavg-synthlang-world-{seed}")
    reserved = set(COLOURS + HOMES + FOODS + NUMBERS + _WORDS)
    names: list[str] = []
    while len(names) < n_creatures:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS[:14]) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if name not in names and name not in reserved:
            names.append(name)
    out = []
    for i, name in enumerate(names):
        friend = names[(i + rng.randrange(1, n_creatures)) % n_creatures]
        out.append(Creature(name, rng.choice(COLOURS), rng.choice(HOMES), rng.choice(FOODS), friend))
    return tuple(out)


# Sentences -----------------------------------------------------------------------------------
# {n} name, {c} colour, {h} home, {f} food, {fr} friend's name. "the {n}" may become "it" after
# the first sentence of a document; plurals take "{n}s" and plural verbs (agreement to learn).
_ABOUT = (
    "the {n} is {c} .",
    "the {n} lives in the {h} .",
    "the {n} eats {f} .",
    "the {c} {n} eats {f} .",
    "the {n} eats {f} in the {h} .",
    "the {n} is a friend of the {fr} .",
    "where does the {n} live ? in the {h} .",
    "what does the {n} eat ? {f} .",
    "what colour is the {n} ? {c} .",
)
_PRONOUN = (
    "it is {c} .",
    "it lives in the {h} .",
    "it eats {f} .",
    "it is a friend of the {fr} .",
)
_PLURAL = (
    "{n}s are {c} .",
    "{n}s live in the {h} .",
    "{n}s eat {f} .",
    "many {c} {n}s live in the {h} .",
    "{n}s and {fr}s are friends .",
)
_SCENE = (  # true facts of two creatures together
    "the {n} and the {m} meet in the {h} .",
    "the {c} {n} sees a {d} {m} .",
)


def _slots(c: Creature) -> dict[str, str]:
    return {"n": c.name, "c": c.colour, "h": c.home, "f": c.food, "fr": c.friend}


def _about(rng: random.Random, crs: Sequence[Creature], by_name: dict[str, Creature]) -> str:
    c = rng.choice(crs)
    s = _slots(c)
    out = [rng.choice(_ABOUT).format(**s)]
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.45:
            out.append(rng.choice(_PRONOUN).format(**s))
        elif r < 0.75:
            out.append(rng.choice(_ABOUT).format(**s))
        elif r < 0.9:
            out.append(rng.choice(_PLURAL).format(**s))
        else:
            m = by_name[c.friend]
            out.append(rng.choice(_SCENE).format(**s, m=m.name, d=m.colour))
    return " ".join(out)


def _sums(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.7:
            out.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} .")
        else:
            out.append(f"{NUMBERS[a + b]} minus {NUMBERS[b]} is {NUMBERS[a]} .")
    return " ".join(out)


def _document(rng: random.Random, crs: Sequence[Creature], by_name: dict[str, Creature]) -> str:
    return _sums(rng) if rng.random() < 0.2 else _about(rng, crs, by_name)


def _choices(rng: random.Random, right: str, pool: Sequence[str], k: int = 4) -> tuple[list[str], int]:
    wrong = rng.sample([x for x in pool if x != right], k - 1)
    label = rng.randrange(k)
    return wrong[:label] + [right] + wrong[label:], label


def _task(rng: random.Random, crs: Sequence[Creature]) -> list[dict[str, Any]]:
    items: list[tuple[str, str, list[str], int]] = []
    for c in crs:
        items.append(("food", f"what does the {c.name} eat ?", *_choices(rng, c.food, FOODS)))
        items.append(("home", f"the {c.name} lives in the", *_choices(rng, c.home, HOMES)))
        items.append(("colour", f"what colour is the {c.name} ?", *_choices(rng, c.colour, COLOURS)))
    for _ in range(len(crs)):
        a, b = rng.randrange(10), rng.randrange(10)
        items.append(("sum", f"{NUMBERS[a]} plus {NUMBERS[b]} is", *_choices(rng, NUMBERS[a + b], NUMBERS)))
    for c in rng.sample(list(crs), min(16, len(crs))):
        singular = rng.random() < 0.5
        q = f"the {c.name}" if singular else f"{c.name}s"
        items.append(("agreement", q, *_choices(rng, "eats" if singular else "eat", ("eats", "eat"), 2)))
    return [{"id": i, "kind": k, "question": q, "choices": ch, "label": y} for i, (k, q, ch, y) in enumerate(items)]


def corpus(seed: int = 0, *, n_train: int = 20_000, n_heldout: int = 400, n_creatures: int = 32) -> Corpus:
    """Training and held-out documents and the zero-shot task for ``seed``.

    Held-out documents are drawn first from their own stream; training documents that repeat one
    of them verbatim are redrawn, so the two splits share no document (they do share the world's
    facts: held-out loss measures how well the model knows the language and the world).

    Args:
        seed: everything is a function of it.
        n_train, n_heldout: documents in each split.
        n_creatures: size of the world.

    Returns:
        A :class:`Corpus`.
    """
    crs = world(seed, n_creatures)
    by_name = {c.name: c for c in crs}
    rng_h = random.Random(f"ckptavg-synthlang-heldout-{seed}")
    heldout = tuple(_document(rng_h, crs, by_name) for _ in range(n_heldout))
    seen = set(heldout)
    rng_t = random.Random(f"ckptavg-synthlang-train-{seed}")
    train: list[str] = []
    while len(train) < n_train:
        doc = _document(rng_t, crs, by_name)
        if doc not in seen:
            train.append(doc)
    task = _task(random.Random(f"ckptavg-synthlang-task-{seed}"), crs)
    return Corpus(crs, tuple(train), heldout, tuple(task))


# Files ---------------------------------------------------------------------------------------
def write_jsonl(path: str | os.PathLike[str], rows: Iterable[str | dict[str, Any]]) -> Path:
    """One JSON object per line; plain strings become ``{"text": …}`` (what ``ckptavg eval --text`` reads)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r} if isinstance(r, str) else r) + "\n")
    return p


def write_task(folder: str | os.PathLike[str], items: Sequence[dict[str, Any]], name: str = "critter_facts") -> Path:
    """Write ``folder/name.yaml`` and ``folder/name.jsonl``: a zero-shot multiple-choice task for lm-eval.

    ``data_files`` is written as an absolute path because lm-eval resolves a relative one against
    the working directory, not the YAML. Use it with ``include_path=folder`` and task ``name``.

    Returns:
        The YAML path.
    """
    d = Path(folder).resolve()
    data = write_jsonl(d / f"{name}.jsonl", items)
    yaml = d / f"{name}.yaml"
    yaml.write_text(
        "# Zero-shot multiple choice in Critter, ckptavg's synthetic demo language (ckptavg.demo.synthlang):\n"
        "# facts of the world (food, home, colour), sums in words, and subject-verb agreement.\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "num_fewshot: 0\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        f"  version: {GENERATOR_VERSION}.0\n"
    )
    return yaml


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer, as Pythia's (``<|endoftext|>`` = 0, ``<|padding|>`` = 1), trained
    on ``texts`` with the ``tokenizers`` library and wrapped so ``AutoTokenizer`` loads it back.

    Deterministic for the same texts and ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = TOKENIZER_SETTINGS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=t["add_prefix_space"])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=t["trim_offsets"])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(t["special_tokens"]), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # clean_up_tokenization_spaces=False: decode gives back the text on every transformers version
    # (4.x defaulted to True, which drops the space before "." that byte-level BPE keeps)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=t["bos"], eos_token=t["eos"], unk_token=t["unk"],
                                   pad_token=t["pad"], model_max_length=t["model_max_length"],
                                   clean_up_tokenization_spaces=t["clean_up_tokenization_spaces"])


__all__ = ["Corpus", "Creature", "corpus", "train_tokenizer", "world", "write_jsonl", "write_task"]
