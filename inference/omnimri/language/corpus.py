"""The project's own text corpus: instructions, questions and out-of-scope requests.

Every phrase list below is split into *training* templates and *held-out* templates (every
fourth entry, :func:`split`); the held-out ones never appear in training and are what the
evaluation measures. Examples carry the labels of all heads of the text encoder
(:mod:`inference.omnimri.language.textmodel`); a head that does not apply is ``IGNORE``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from inference.omnimri.config import INSTRUCTIONS

IGNORE = -100
"""Label of a head that does not apply to an example (PyTorch's ignore index)."""

INTENTS = ("instruction", "question", "refuse")
TASKS: tuple[str, ...] = tuple(INSTRUCTIONS)
"""The five canonical instructions, in :data:`inference.omnimri.config.INSTRUCTIONS` order."""
QTYPES = ("presence", "count", "side", "lobe", "size", "diagnosis", "volume")
TARGETS = ("lesion", "wmh", "mass")
"""What a lesion question is about: any lesion, white-matter hyperintensities, masses."""
TISSUES = ("brain", "csf", "grey matter", "white matter")
SIDES = ("any", "left", "right")
LOBES = ("any", "frontal", "parietal", "temporal", "occipital", "cerebellum")

HEADS: dict[str, tuple[str, ...]] = {
    "intent": INTENTS, "qtype": QTYPES, "target": TARGETS, "tissue": TISSUES, "side": SIDES,
    "lobe": LOBES,
}
"""Single-label heads and their classes (the multi-label ``tasks`` head is apart)."""

Split = Literal["train", "heldout"]


def split(items: Sequence[str], which: Split) -> list[str]:
    """Training templates (3 of every 4) or held-out templates (every fourth, from index 3)."""
    return [t for n, t in enumerate(items) if (n % 4 == 3) == (which == "heldout")]


# --------------------------------------------------------------------------- instructions

TASK_PHRASES: dict[str, tuple[str, ...]] = {
    "segment brain tissues": (
        "segment brain tissues", "segment the brain tissues", "tissue segmentation",
        "measure the tissue volumes", "segment grey matter, white matter and csf",
        "give me the grey and white matter volumes", "label csf, grey and white matter",
        "segment the brain into tissue classes", "do a tissue segmentation of the brain",
        "split the brain into grey matter, white matter and csf", "quantify grey and white matter",
        "outline the cerebrospinal fluid, grey matter and white matter", "compute the brain volume",
        "segment the brain", "map the tissue classes", "brain tissue volumes",
        "measure grey matter and white matter", "segment csf and brain parenchyma",
        "work out the tissue volumes", "tissue volumes of the brain",
    ),
    "detect abnormalities": (
        "detect abnormalities", "look for white-matter lesions", "find lesions",
        "detect lesions", "look for masses", "search for abnormalities", "find any tumour",
        "detect white matter hyperintensities", "flag focal lesions", "check for abnormal findings",
        "locate any mass or lesion", "screen for lesions", "mark the abnormalities",
        "segment the lesions", "look for anything abnormal", "find white matter lesions",
        "look for lesions", "detect tumours and white matter lesions", "spot any abnormality",
        "search for masses and lesions",
    ),
    "suggest a diagnosis": (
        "suggest a diagnosis", "give a diagnosis", "propose a diagnosis",
        "suggest the most likely diagnosis", "classify the study as normal, small vessel disease "
        "or mass", "provide a diagnostic suggestion", "diagnose the scan", "give a diagnostic "
        "impression", "classify the case", "offer a likely diagnosis", "make a diagnosis",
        "state the diagnosis", "provide a diagnosis", "decide whether the study is normal",
        "give me the most probable diagnosis", "diagnose this study",
    ),
    "write the report": (
        "write the report", "write a short report", "draft a radiology report",
        "write findings and impression", "generate a report", "dictate a report",
        "produce a structured report", "summarise the findings in a report", "report the study",
        "compose the radiology report", "write up the findings", "write a report",
        "prepare a brief report", "create the report", "draft the findings and impression",
        "write a concise report",
    ),
    "reconstruct": (
        "reconstruct", "reconstruct the image", "denoise the image",
        "produce a reconstructed image", "clean up the image", "run the reconstruction",
        "restore the image quality", "generate a reconstructed series", "reconstruct the series",
        "denoise the scan", "make a reconstruction", "reconstruct the volume",
    ),
}
"""Paraphrases of each instruction (split into training and held-out by :func:`split`)."""

TASK_VERBS: dict[str, tuple[str, ...]] = {
    "segment brain tissues": ("segment", "measure", "quantify", "outline", "label", "map",
                              "delineate", "compute", "estimate", "work out", "give me",
                              "calculate"),
    "detect abnormalities": ("detect", "find", "look for", "search for", "screen for", "flag",
                             "locate", "mark", "spot", "check for", "identify", "highlight"),
    "suggest a diagnosis": ("suggest", "give", "propose", "provide", "state", "offer", "make",
                            "return", "tell me"),
    "write the report": ("write", "draft", "generate", "produce", "compose", "dictate",
                         "prepare", "create", "type up", "give me"),
    "reconstruct": ("reconstruct", "denoise", "restore", "clean up", "enhance", "rebuild",
                    "regenerate", "redo"),
}
"""Verbs of each instruction, combined with :data:`TASK_OBJECTS` (both split train/held-out)."""
TASK_OBJECTS: dict[str, tuple[str, ...]] = {
    "segment brain tissues": ("the brain tissues", "the tissue volumes", "grey and white matter",
                              "csf, grey matter and white matter", "the brain volume",
                              "the tissue classes", "grey matter and white matter volumes",
                              "the cerebrospinal fluid", "the grey matter", "tissue volumes",
                              "the white matter volume", "brain tissue"),
    "detect abnormalities": ("lesions", "abnormalities", "masses", "tumours",
                             "white matter lesions", "hyperintensities", "anything abnormal",
                             "focal lesions", "white-matter hyperintensities", "any mass",
                             "abnormal findings", "small vessel lesions"),
    "suggest a diagnosis": ("a diagnosis", "the diagnosis", "a likely diagnosis",
                            "a diagnostic impression", "the most probable diagnosis",
                            "a diagnostic suggestion", "your diagnosis", "a working diagnosis"),
    "write the report": ("the report", "a report", "a short report", "a brief report",
                         "findings and impression", "a radiology report", "the findings",
                         "a concise report", "the impression", "a full report",
                         "a written report", "the radiology report"),
    "reconstruct": ("the image", "the scan", "the series", "the volume", "the images",
                    "a reconstruction", "the mri", "the picture"),
}
SUFFIXES = ("", "", "", ".", "!", ", thank you", ", cheers", " asap", " now", " for me",
            ", ok?", " please", " today", ", if possible")
"""Endings of instructions (split train/held-out like every list)."""


def task_phrase(task: str, rng: random.Random, which: Split) -> str:
    """A paraphrase of ``task``: a fixed phrase, or a verb with an object."""
    if rng.random() < 0.5:
        return rng.choice(split(TASK_PHRASES[task], which))
    other = {p for ph in TASK_PHRASES.values()
             for p in split(ph, "heldout" if which == "train" else "train")}
    while True:  # a verb+object pair that is a fixed phrase of the other split is not used
        text = (f"{rng.choice(split(TASK_VERBS[task], which))} "
                f"{rng.choice(split(TASK_OBJECTS[task], which))}")
        if text not in other:
            return text


WRAPPERS = (
    "{x}", "please {x}", "{x} please", "could you {x}", "{x} for this series",
    "i want you to {x}", "kindly {x}", "{x} on this mri", "task: {x}", "can you {x}",
    "we need you to {x}", "{x}, thanks", "go ahead and {x}", "just {x}", "{x} on this scan",
    "would you {x}", "{x} for this patient", "your task is to {x}", "{x}.", "i need you to {x}",
)
CONNECTORS = (
    " and ", ", then ", "; also ", " as well as ", ", and ", " plus ", ", after that ",
    " and also ", " followed by ", ", ", " then ", "; ",
)

OUT_OF_SCOPE = (
    "segment the liver", "detect lung nodules", "write a poem", "translate the report into "
    "french", "segment the spinal cord", "delete the series", "send the study to the cloud",
    "detect fractures", "measure the ejection fraction", "anonymise the images",
    "estimate the brain age", "predict survival", "compute perfusion maps",
    "segment the hippocampus", "register the scan to another patient", "book an appointment",
    "find the kidney stones", "order a ct scan", "detect pneumonia", "segment the heart",
    "email the results to the referrer", "change the patient name", "measure the bone density",
    "look for breast cancer", "compute the fractional anisotropy", "count the vertebrae",
    "segment the prostate", "print the images", "prescribe medication", "detect aneurysms",
    "track the tumour over five years", "write a discharge letter", "tell me a joke",
    "segment the knee cartilage", "measure blood flow", "detect bleeding in the abdomen",
    "reconstruct the knee", "play some music", "compare with last year's ct",
    "grade the glioma molecularly", "look for appendicitis", "find the pulmonary embolism",
)
"""Requests the model cannot follow (brain-adjacent ones too); refused, never guessed."""

OOS_ORGANS = (
    "liver", "kidneys", "heart", "lungs", "spleen", "pancreas", "spine", "knee", "hip",
    "shoulder", "prostate", "bladder", "thyroid", "breast", "colon", "stomach", "aorta", "ankle",
    "wrist", "eyes", "teeth", "sinuses", "pelvis", "gallbladder", "ovaries", "uterus", "elbow",
    "hippocampus", "pituitary gland", "inner ear", "carotid arteries", "cervical spine",
)
OOS_FINDINGS = (
    "fractures", "pneumonia", "kidney stones", "appendicitis", "gallstones", "breast cancer",
    "lung nodules", "pulmonary embolism", "aneurysms", "arthritis", "scoliosis", "osteoporosis",
    "covid", "polyps", "herniated discs", "torn ligaments", "diabetes", "hypertension",
    "liver cirrhosis", "heart failure", "skin cancer", "dental caries", "sinusitis",
    "multiple sclerosis activity", "vasospasm", "hydrocephalus shunt failure", "a stroke",
    "coronary disease",
)
OOS_QUANTITIES = (
    "ejection fraction", "blood pressure", "bone density", "heart rate", "patient's age",
    "patient's weight", "time", "date", "weather", "price", "cost of the scan",
    "radiation dose", "hippocampal volume", "cortical thickness", "brain age", "blood flow",
    "temperature", "patient's name", "referring doctor", "insurance number", "kidney function",
    "cholesterol", "oxygen saturation", "tumour grade",
)
OOS_DOCUMENTS = (
    "poem", "joke", "discharge letter", "invoice", "email to the family", "song", "story",
    "prescription", "referral letter", "insurance claim", "tweet", "shopping list",
)
OOS_INSTRUCTION_FRAMES = (
    "segment the {organ}", "detect {finding}", "look for {finding}", "measure the {quantity}",
    "write a {doc}", "reconstruct the {organ}", "find {finding}", "compute the {quantity}",
    "screen for {finding}", "check the {organ}", "estimate the {quantity}",
    "report on the {organ}", "diagnose {finding}", "outline the {organ}", "draft a {doc}",
    "search for {finding}",
)
OOS_QUESTION_FRAMES = (
    "any {finding}?", "is the {organ} normal?", "what is the {quantity}?", "how big is the "
    "{organ}?", "are there {finding}?", "does the patient have {finding}?",
    "do you see {finding}?", "what is the {quantity} of this patient?", "is there {finding}?",
    "how large is the {organ}?", "tell me the {quantity}", "is the {organ} enlarged?",
)
"""Out-of-scope frames filled from the lists above (each list split train/held-out)."""


def _oos_fill(frame: str, rng: random.Random, which: Split) -> str:
    return frame.format(organ=rng.choice(split(OOS_ORGANS, which)),
                        finding=rng.choice(split(OOS_FINDINGS, which)),
                        quantity=rng.choice(split(OOS_QUANTITIES, which)),
                        doc=rng.choice(split(OOS_DOCUMENTS, which)))

# --------------------------------------------------------------------------- questions

TARGET_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "lesion": (("lesion", "lesions"), ("abnormality", "abnormalities"),
               ("focal lesion", "focal lesions")),
    "wmh": (("white matter lesion", "white matter lesions"),
            ("white-matter hyperintensity", "white-matter hyperintensities"),
            ("wmh", "wmhs"), ("small vessel lesion", "small vessel lesions")),
    "mass": (("mass", "masses"), ("tumour", "tumours"), ("tumor", "tumors"),
             ("space-occupying lesion", "space-occupying lesions")),
}
TISSUE_WORDS: dict[str, tuple[str, ...]] = {
    "brain": ("brain", "total brain", "whole brain", "brain parenchyma"),
    "csf": ("csf", "cerebrospinal fluid"),
    "grey matter": ("grey matter", "gray matter", "gm"),
    "white matter": ("white matter", "wm"),
}

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "presence": (
        "is there a {t}{loc}?", "are there any {tp}{loc}?", "does this scan show a {t}{loc}?",
        "any {tp}{loc}?", "do you see a {t}{loc}?", "is a {t} present{loc}?",
        "can you find a {t}{loc}?", "has the patient got a {t}{loc}?",
        "is there evidence of a {t}{loc}?", "are {tp} present{loc}?",
        "does the mri show {tp}{loc}?",
        "is any {t} visible{loc}?",
    ),
    "count": (
        "how many {tp} are there{loc}?", "count the {tp}{loc}", "number of {tp}{loc}?",
        "how many {tp} do you see{loc}?", "what is the number of {tp}{loc}?",
        "how many {tp}{loc}?", "how many {tp} can you find{loc}?", "give the count of {tp}{loc}",
        "tell me how many {tp} there are{loc}",
    ),
    "side": (
        "which side is the {t} on?", "is the {t} on the left or the right?",
        "what side is the largest {t}?", "on which side is the {t}?",
        "left or right: where is the {t}?", "which hemisphere has the {t}?",
        "which side is the biggest {t} on?", "is the {t} left-sided or right-sided?",
    ),
    "lobe": (
        "which lobe is the {t} in?", "where is the {t}?", "in what lobe is the largest {t}?",
        "what lobe contains the {t}?", "where is the largest {t} located?",
        "which part of the brain has the {t}?", "in which lobe is the {t} located?",
        "where exactly is the {t}?",
    ),
    "size": (
        "how big is the {t}?", "what is the size of the largest {t}?",
        "how large is the {t} in mm?", "what size is the {t}?", "how large is the largest {t}?",
        "what is the diameter of the {t}?", "measure the {t}", "how many millimetres is the {t}?",
    ),
    "diagnosis": (
        "what is the diagnosis?", "what is the most likely diagnosis?", "is this scan normal?",
        "what do you think this is?", "is the study normal or abnormal?",
        "what is your impression?", "does the patient have small vessel disease?",
        "what is the likely diagnosis?", "what disease does this show?", "is the brain normal?",
        "what is the working diagnosis?", "is there any disease?",
    ),
    "volume": (
        "what is the {tissue} volume?", "how much {tissue} is there?",
        "total {tissue} volume in ml?", "what is the volume of the {tissue}?",
        "how large is the {tissue} volume?", "give me the {tissue} volume",
        "how many millilitres of {tissue}?", "{tissue} volume?",
    ),
}
"""Question frames: ``{t}``/``{tp}`` a lesion word (singular/plural), ``{loc}`` a location
filter, ``{tissue}`` a tissue word."""

LOCATIONS = (
    ("", "any", "any"), (" in the {side} {lobe} lobe", None, None),
    (" in the {lobe} lobe", "any", None), (" on the {side} side", None, "any"),
    (" in the {side} hemisphere", None, "any"), (" in the cerebellum", "any", "cerebellum"),
    (" in the {side} cerebellar hemisphere", None, "cerebellum"),
)
"""Location filters of presence/count questions: text, side (``None``: drawn), lobe."""

OUT_OF_SCOPE_QUESTIONS = (
    "what is the patient's name?", "when was the patient born?", "is the liver enlarged?",
    "what is the ejection fraction?", "who referred this patient?", "what's the weather today?",
    "is there a fracture?", "how old is the patient?", "what is the patient id?",
    "is the heart enlarged?", "are the lungs clear?", "what medication should be given?",
    "will the patient survive?", "what is the patient's address?", "is the kidney normal?",
    "what time is it?", "how much does this scan cost?", "which hospital is this?",
    "is there a pneumothorax?", "what is the blood pressure?",
)


@dataclass(frozen=True)
class Example:
    """One text with the labels of every head (``IGNORE`` where a head does not apply)."""

    text: str
    intent: int
    tasks: tuple[int, ...] = (0, 0, 0, 0, 0)
    labels: dict[str, int] = field(default_factory=dict)
    """Single-label heads other than ``intent``: ``qtype``, ``target``, ``tissue``, ``side``,
    ``lobe``."""

    def label(self, head: str) -> int:
        """The class index of ``head`` (``IGNORE`` when it does not apply)."""
        return self.intent if head == "intent" else self.labels.get(head, IGNORE)


def _instruction(rng: random.Random, which: Split) -> Example:
    n_tasks = rng.choice((1, 1, 1, 2, 2, 3))
    chosen = rng.sample(TASKS, n_tasks)
    parts = [task_phrase(t, rng, which) for t in chosen]
    body = parts[0]
    for p in parts[1:]:
        body += rng.choice(split(CONNECTORS, which)) + p
    text = rng.choice(split(WRAPPERS, which)).format(x=body) + rng.choice(
        split(SUFFIXES, which))
    return Example(text, INTENTS.index("instruction"),
                   tuple(int(t in chosen) for t in TASKS))


def _refused_instruction(rng: random.Random, which: Split) -> Example:
    r = rng.random()
    if r < 0.3:
        bad = rng.choice(split(OUT_OF_SCOPE, which))
    elif r < 0.7:
        bad = _oos_fill(rng.choice(split(OOS_INSTRUCTION_FRAMES, which)), rng, which)
    else:  # an instruction's verb on something it does not cover
        verb = rng.choice(split(TASK_VERBS[rng.choice(TASKS)], which))
        bad = verb + " " + _oos_fill(rng.choice(("the {organ}", "{finding}", "the {quantity}",
                                                 "a {doc}")), rng, which)
    if rng.random() < 0.4:  # part of the request cannot be followed: the whole is refused
        good = task_phrase(rng.choice(TASKS), rng, which)
        pair = [good, bad] if rng.random() < 0.5 else [bad, good]
        bad = pair[0] + rng.choice(split(CONNECTORS, which)) + pair[1]
    return Example(rng.choice(split(WRAPPERS, which)).format(x=bad) + rng.choice(
        split(SUFFIXES, which)), INTENTS.index("refuse"))


def _question(rng: random.Random, which: Split) -> Example:
    qtype = rng.choice(QTYPES)
    frame = rng.choice(split(QUESTION_TEMPLATES[qtype], which))
    labels = {"qtype": QTYPES.index(qtype)}
    if qtype == "volume":
        tissue = rng.choice(TISSUES)
        labels["tissue"] = TISSUES.index(tissue)
        text = frame.format(tissue=rng.choice(TISSUE_WORDS[tissue]))
    elif qtype == "diagnosis":
        text = frame
    else:
        target = rng.choice(TARGETS)
        t, tp = rng.choice(TARGET_WORDS[target])
        labels["target"] = TARGETS.index(target)
        loc = ""
        if qtype in ("presence", "count"):
            loc_t, side, lobe = rng.choice(LOCATIONS)
            side = side or rng.choice(SIDES[1:])
            lobe = lobe or rng.choice(LOBES[1:5])
            loc = loc_t.format(side=side, lobe=lobe)
            labels["side"], labels["lobe"] = SIDES.index(side), LOBES.index(lobe)
        text = frame.format(t=t, tp=tp, loc=loc)
    if rng.random() < 0.3:
        text = rng.choice(("please, ", "quick question: ", "tell me, ", "doctor asks: ",
                           "")) + text
    return Example(text, INTENTS.index("question"), labels=labels)


def _refused_question(rng: random.Random, which: Split) -> Example:
    text = (rng.choice(split(OUT_OF_SCOPE_QUESTIONS, which)) if rng.random() < 0.4
            else _oos_fill(rng.choice(split(OOS_QUESTION_FRAMES, which)), rng, which))
    return Example(text, INTENTS.index("refuse"))


FILLERS = ("now", "also", "the", "this", "quickly", "carefully", "here", "today", "again",
           "kindly", "first", "mri", "images", "study", "exam", "routine", "ok")
"""Words inserted at random in training text (the model learns to ignore them)."""


def _protected() -> frozenset[str]:
    """Words that carry what an in-scope text asks for (never dropped or replaced there)."""
    words: set[str] = set()
    for phrases in TASK_OBJECTS.values():  # the objects decide the task; verbs vary freely
        for ph in phrases:
            words.update(ph.replace(",", " ").split())
    words.update(("report", "diagnosis", "diagnose", "diagnostic", "reconstruct",
                  "reconstruction", "reconstructed", "denoise", "segment", "segmentation",
                  "tissue", "tissues", "classify", "normal", "findings", "impression"))
    for pairs in TARGET_WORDS.values():
        for pair in pairs:
            for w in pair:
                words.update(w.split())
    for tw in TISSUE_WORDS.values():
        for w in tw:
            words.update(w.split())
    words.update(SIDES + LOBES + ("lobe", "side", "hemisphere", "cerebellar", "how", "many",
                                  "which", "where", "what", "big", "large", "size", "volume"))
    return frozenset(words - {"the", "a", "and", "any", "of", "in", "for", "me", "give", "do",
                              "make", "up", "run", "to", "into", "whether", "is"})


PROTECTED = _protected()


def augment(text: str, rng: random.Random, protect: bool = True) -> str:
    """A noisy variant of training ``text``.

    A filler word inserted, a word dropped or a word replaced by a made-up one, each sometimes,
    so the encoder keys on the words that matter and treats words it never saw as unknown
    rather than as evidence.
    """
    words = text.split()
    free = [k for k, w in enumerate(words)
            if not protect or w.lower().strip(",.;:?") not in PROTECTED]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(FILLERS))
        free = [k for k, w in enumerate(words)
                if not protect or w.lower().strip(",.;:?") not in PROTECTED]
    if free and len(words) > 3 and rng.random() < 0.15:
        del words[rng.choice(free)]
        free = [k for k, w in enumerate(words)
                if not protect or w.lower().strip(",.;:?") not in PROTECTED]
    for p in (0.5, 0.2):
        if free and rng.random() < p:
            words[rng.choice(free)] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                              for _ in range(rng.randint(3, 9)))
    return " ".join(words)


def generate(n: int, which: Split, seed: int, *, noisy: bool = False) -> list[Example]:
    """``n`` examples from the ``which`` templates, deterministic from ``seed``.

    40 % instructions, 35 % questions, 25 % refusals (instructions and questions); ``noisy``:
    60 % of them through :func:`augment` (training).
    """
    rng = random.Random(f"{seed}-{which}")
    makers = ((0.40, _instruction), (0.35, _question), (0.15, _refused_instruction),
              (0.10, _refused_question))
    out = []
    for _ in range(n):
        r = rng.random()
        for p, make in makers:
            if r < p:
                out.append(make(rng, which))
                break
            r -= p
        else:
            out.append(_refused_question(rng, which))
    if noisy:
        out = [Example(augment(e.text, rng, protect=e.intent != INTENTS.index("refuse")),
                       e.intent, e.tasks, e.labels)
               if rng.random() < 0.6 else e for e in out]
    # capitalisation varies in real text (the tokenizer lowercases; kept for realism)
    return [Example(e.text[:1].upper() + e.text[1:], e.intent, e.tasks, e.labels)
            if rng.random() < 0.3 else e for e in out]


def all_text(which: Split = "train") -> list[str]:
    """Every phrase of the ``which`` templates plus the report vocabulary (tokenizer corpus)."""
    from inference.omnimri.language.narrate import vocabulary_text

    text: list[str] = []
    for phrases in [*TASK_PHRASES.values(), *TASK_VERBS.values(), *TASK_OBJECTS.values()]:
        text += split(phrases, which)
    text += split(OUT_OF_SCOPE, which) + split(OUT_OF_SCOPE_QUESTIONS, which)
    text += [_oos_fill(f, random.Random(n), which) for n, f in
             enumerate(split(OOS_INSTRUCTION_FRAMES + OOS_QUESTION_FRAMES, which) * 10)]
    for frames in QUESTION_TEMPLATES.values():
        text += split(frames, which)
    for words in TARGET_WORDS.values():
        text += [w for pair in words for w in pair]
    for tw in TISSUE_WORDS.values():
        text += list(tw)
    text += list(SIDES) + list(LOBES) + split(WRAPPERS, which)
    text += [e.text for e in generate(3000, which, seed=12345)]
    text += vocabulary_text()
    return text
