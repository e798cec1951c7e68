"""The served text encoder (ONNX Runtime, CPU): instruction routing and question parsing.

A package declares its language model in ``model.yaml`` ``extra.language`` (folder, tokenizer,
encoder; written by ``omnimri-node train language``). :func:`route_instructions` maps a
pipeline's free-text instructions to the package's canonical tasks, or refuses them
(:class:`InstructionRefused`) when the model reads them as something it cannot do, is not
sure, or the text has a word the model was never taught (its vocabulary is its training
corpus: a word outside it could change the request in a way it cannot read): an instruction is
never guessed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.omnimri.language import corpus as C

INTENT_MIN = 0.9
"""Least intent probability the model must give to act on a text (else it refuses)."""
TASK_MIN = 0.5
"""A task is selected when its probability is at least this."""


class InstructionRefused(ValueError):
    """A free-text instruction the model cannot follow (the message says why)."""


@dataclass(frozen=True)
class Parse:
    """What the text encoder read in one text."""

    text: str
    intent: str
    """``instruction``, ``question`` or ``refuse``."""
    intent_p: float
    tasks: tuple[str, ...] = ()
    """Canonical instructions (for an ``instruction``)."""
    qtype: str = ""
    target: str = ""
    tissue: str = ""
    side: str = "any"
    lobe: str = "any"
    unknown: tuple[str, ...] = ()
    """Words of the text the model was never taught (not in its tokenizer's word list)."""

    @property
    def confident(self) -> bool:
        """Intent probability at least :data:`INTENT_MIN` and no unknown word."""
        return self.intent_p >= INTENT_MIN and not self.unknown


def taught_words(tok: Any) -> frozenset[str]:
    """The words a tokenizer's model was taught: its whole-word vocabulary entries."""
    return frozenset(w for w in tok.get_vocab() if not w.startswith("##"))


def unknown_words(tok: Any, words: frozenset[str], text: str) -> tuple[str, ...]:
    """Words of ``text`` (letters only, two or more) not in ``words``, in order, once each."""
    norm = tok.normalizer.normalize_str(text)
    out: list[str] = []
    for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
        if len(w) > 1 and w.isalpha() and w not in words and w not in out:
            out.append(w)
    return tuple(out)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    out: np.ndarray = e / e.sum(-1, keepdims=True)
    return out


class TextModel:
    """Tokenizer + ONNX text encoder of one package.

    Args:
        folder: The language folder (``tokenizer.json``, ``text_encoder.onnx``).
        max_tokens: Longest input in tokens.
        engine: The vision model's engine preference (``auto``, a name or a list): TensorRT
            when it is in it and usable here, else ONNX Runtime on CPU
            (:func:`inference.omnimri.language.trt.language_session`).
    """

    def __init__(self, folder: Path, max_tokens: int = 40, tokenizer: str = "tokenizer.json",
                 encoder: str = "text_encoder.onnx",
                 engine: str | tuple[str, ...] = "auto") -> None:
        from tokenizers import Tokenizer

        from inference.omnimri.language.trt import encoder_dims, language_session

        self.folder = folder
        self.max_tokens = max_tokens
        self.tok = Tokenizer.from_file(str(folder / tokenizer))
        self.words = taught_words(self.tok)
        """The words the model was taught."""
        self.sess = language_session(folder / encoder, engine, dims=encoder_dims(max_tokens))

    def logits(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Raw logits of every head for ``texts``."""
        from inference.omnimri.language.textmodel import OUTPUT_NAMES, encode_batch

        ids, mask = encode_batch(self.tok, texts, self.max_tokens)
        out = self.sess.run(list(OUTPUT_NAMES), {"input_ids": ids, "attention_mask": mask})
        return dict(zip(OUTPUT_NAMES, out, strict=True))

    def unknown_words(self, text: str) -> tuple[str, ...]:
        """Words of ``text`` the model was never taught (:func:`unknown_words`)."""
        return unknown_words(self.tok, self.words, text)

    def parse(self, texts: list[str]) -> list[Parse]:
        """One :class:`Parse` per text."""
        if not texts:
            return []
        lg = self.logits([" ".join(t.split()) for t in texts])
        intent = _softmax(lg["intent"])
        tasks = 1 / (1 + np.exp(-lg["tasks"]))
        out = []
        for n, text in enumerate(texts):
            k = int(np.argmax(intent[n]))
            name = C.INTENTS[k]
            kw: dict[str, Any] = {}
            if name == "instruction":
                kw["tasks"] = tuple(t for t, p in zip(C.TASKS, tasks[n], strict=True)
                                    if p >= TASK_MIN)
            elif name == "question":
                for h in ("qtype", "target", "tissue", "side", "lobe"):
                    kw[h] = C.HEADS[h][int(np.argmax(lg[h][n]))]
            out.append(Parse(text=text, intent=name, intent_p=round(float(intent[n, k]), 4),
                             unknown=self.unknown_words(text), **kw))
        return out


@functools.lru_cache(maxsize=4)
def _load(folder: str, max_tokens: int, tokenizer: str, encoder: str,
          engine: str | tuple[str, ...] = "auto") -> TextModel:
    return TextModel(Path(folder), max_tokens, tokenizer, encoder, engine)


def text_model_for(package: Any, engine: str | Sequence[str] = "auto") -> TextModel | None:
    """The package's text model (``extra.language``), cached; ``None`` if it has none.

    ``engine``: the vision model's engine preference (a pipeline's ``engine`` or
    ``models.engine_order``); ``auto`` tries TensorRT, then ONNX Runtime on CPU.
    """
    spec = dict(package.spec.extra).get("language")
    if not spec:
        return None
    folder = package.version_folder() / spec.get("folder", "language")
    return _load(str(folder), int(spec.get("max_tokens", 40)),
                 spec.get("tokenizer", "tokenizer.json"),
                 spec.get("encoder", "text_encoder.onnx"),
                 engine if isinstance(engine, str) else tuple(engine))


def refusal_reason(p: Parse) -> str | None:
    """Why the model will not act on ``p`` as an instruction (``None``: it will)."""
    if p.unknown:
        words = ", ".join(repr(w) for w in p.unknown)
        return (f"the model cannot follow {p.text!r}: it was never taught the word"
                f"{'s' if len(p.unknown) > 1 else ''} {words} (a request outside what it does, "
                f"or a misspelling); it does: {'; '.join(C.TASKS)}")
    if p.intent == "refuse":
        return (f"the model cannot follow {p.text!r}: it is outside what it does "
                f"({'; '.join(C.TASKS)})")
    if p.intent == "question":
        return (f"{p.text!r} reads as a question, not an instruction; ask it with "
                "'omnimri-node ask SERIES_UID \"...\"'")
    if not p.confident:
        return (f"the model is not sure what {p.text!r} asks for (confidence "
                f"{p.intent_p:.2f} < {INTENT_MIN}); rephrase it or use one of: "
                f"{'; '.join(C.TASKS)}")
    if not p.tasks:
        return f"the model found no task it can do in {p.text!r}"
    return None


def route_instructions(instructions: list[str], package: Any) -> list[str]:
    """The canonical instructions of ``package`` that free-text ``instructions`` ask for.

    Canonical instructions (one of ``package.spec.tasks``, any case/spacing) pass unchanged
    without loading the text model; any other text is read by the package's text encoder.
    The result keeps the canonical order, without duplicates.

    Raises:
        InstructionRefused: A text the model cannot follow, is not sure about, or that needs
            a task the package does not have; or free text with no text model in the package.
    """
    known = {" ".join(t.lower().split()): t for t in package.spec.tasks}
    chosen: set[str] = set()
    free = []
    for ins in instructions:
        key = " ".join(ins.lower().split())
        if key in known:
            chosen.add(known[key])
        else:
            free.append(ins)
    if free:
        tm = text_model_for(package)
        if tm is None:
            raise InstructionRefused(
                f"{free[0]!r} is not one of the package's instructions ({'; '.join(known)}) "
                "and the package has no language model to read free text")
        for p in tm.parse(free):
            why = refusal_reason(p)
            if why:
                raise InstructionRefused(why)
            missing = [t for t in p.tasks if t not in known.values()]
            if missing:
                raise InstructionRefused(f"{p.text!r} needs {missing[0]!r}, which this package "
                                         "does not provide")
            chosen.update(p.tasks)
    return [t for t in package.spec.tasks if t in chosen]
