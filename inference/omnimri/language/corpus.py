"""The project's own text corpus: instructions, questions and out-of-scope requests.

Texts are generated compositionally from two kinds of lists:

* **Lexicon** (in scope): the words and phrases that name what the model does - task verbs,
  task objects and nouns, lesion words, tissue words, sides, lobes, places, fillers. It is the
  model's vocabulary and is taught whole: a text encoder trained from scratch cannot know that
  an English word it never saw means "reconstruct". What is held out of the lexicon is
  *combinations*: one verb-object pair in four per task (:func:`pair_split`) never appears in
  training.
* **Templates**: every sentence frame - request wrappers (politeness), clause frames (word
  order, adverbs, places, nominal requests), connectors of combined requests, endings,
  question frames and prefixes, out-of-scope frames. Every template list is split by
  :func:`split`: 3 of 4 entries train, every fourth is **held out** and only used by the
  evaluation.

Out-of-scope text (other organs, other modalities, other findings and measures, treatment and
prognosis, patient data and administration, documents, nonsense, and in-scope requests mixed
with any of these) is generated separately (:func:`_refused_instruction`,
:func:`_refused_question`). Its lexicon is open-ended, so it is split like a template list:
held-out organs, modalities, findings, drugs... are never seen in training.

Examples carry the labels of all heads of the text encoder
(:mod:`inference.omnimri.language.textmodel`); a head that does not apply is ``IGNORE``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
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


def pair_split(verb: int, obj: int, which: Split) -> bool:
    """Whether verb ``verb`` with object ``obj`` (indices in a task's lists) is in ``which``.

    One pair in four is held out; every verb and every object still appears in training with
    three quarters of its partners.
    """
    return ((verb + obj) % 4 == 3) == (which == "heldout")


# --------------------------------------------------------------------------- in-scope lexicon

TASK_VERBS: dict[str, tuple[str, ...]] = {
    "segment brain tissues": ("segment", "measure", "quantify", "outline", "label", "map",
                              "delineate", "compute", "estimate", "work out", "calculate",
                              "determine", "parcellate", "separate", "subdivide"),
    "detect abnormalities": ("detect", "find", "look for", "search for", "screen for", "flag",
                             "locate", "mark", "spot", "check for", "identify", "highlight",
                             "point out", "pick up", "hunt for", "watch for"),
    "suggest a diagnosis": ("suggest", "give", "propose", "provide", "state", "offer", "make",
                            "return", "come up with", "put forward", "reach", "formulate"),
    "write the report": ("write", "draft", "generate", "produce", "compose", "dictate",
                         "prepare", "create", "type up", "put together", "write up", "issue",
                         "author", "deliver"),
    "reconstruct": ("reconstruct", "denoise", "restore", "clean up", "enhance", "rebuild",
                    "regenerate", "redo", "sharpen", "improve", "recompute", "resynthesise"),
}
"""Verbs of each instruction, combined with :data:`TASK_OBJECTS` (pairs split by
:func:`pair_split`)."""

TASK_OBJECTS: dict[str, tuple[str, ...]] = {
    "segment brain tissues": ("the brain tissues", "the tissue volumes", "grey and white matter",
                              "csf, grey matter and white matter", "the brain volume",
                              "the tissue classes", "grey matter and white matter volumes",
                              "the cerebrospinal fluid", "the grey matter", "tissue volumes",
                              "the white matter volume", "brain tissue", "the brain",
                              "gray matter and white matter", "the csf space",
                              "the brain parenchyma", "the tissue compartments",
                              "grey matter, white matter and csf volumes"),
    "detect abnormalities": ("lesions", "abnormalities", "masses", "tumours",
                             "white matter lesions", "hyperintensities", "anything abnormal",
                             "focal lesions", "white-matter hyperintensities", "any mass",
                             "abnormal findings", "small vessel lesions", "tumors", "any lesion",
                             "any abnormality", "brain lesions", "a tumour", "wmh",
                             "space-occupying lesions", "white matter changes"),
    "suggest a diagnosis": ("a diagnosis", "the diagnosis", "a likely diagnosis",
                            "a diagnostic impression", "the most probable diagnosis",
                            "a diagnostic suggestion", "your diagnosis", "a working diagnosis",
                            "the most likely diagnosis", "a probable diagnosis",
                            "a diagnostic conclusion", "a differential diagnosis"),
    "write the report": ("the report", "a report", "a short report", "a brief report",
                         "findings and impression", "a radiology report",
                         "a report of the findings",
                         "a concise report", "a final report", "a full report",
                         "a written report", "the radiology report", "a structured report",
                         "a summary report", "the findings and impression",
                         "a detailed report"),
    "reconstruct": ("the image", "the scan", "the series", "the volume", "the images",
                    "a reconstruction", "the mri", "the picture", "the image quality",
                    "a cleaner image", "the noisy images", "a denoised series"),
}
"""Objects of each instruction's verbs."""

TASK_NOUNS: dict[str, tuple[str, ...]] = {
    "segment brain tissues": ("a tissue segmentation", "tissue segmentation",
                              "brain tissue segmentation", "the tissue volumes",
                              "grey and white matter volumes", "a segmentation of the brain",
                              "brain tissue volumes", "segmentation of grey and white matter"),
    "detect abnormalities": ("lesion detection", "a search for lesions",
                             "detection of abnormalities", "a lesion screen",
                             "abnormality detection", "a check for masses",
                             "detection of white matter lesions", "tumour detection"),
    "suggest a diagnosis": ("a diagnosis", "a diagnostic suggestion", "the likely diagnosis",
                            "a diagnostic impression", "your diagnosis",
                            "the most probable diagnosis", "a classification of the study",
                            "a working diagnosis"),
    "write the report": ("a report", "a radiology report", "a short report",
                         "the findings and impression", "a written report",
                         "a structured report", "the report", "a brief report"),
    "reconstruct": ("a reconstruction", "a denoised image", "image reconstruction",
                    "a reconstructed series", "denoising", "a cleaner image",
                    "a restored image", "the reconstruction"),
}
"""Noun phrases of each instruction (``i'd like {noun}``)."""

GENERIC_VERBS = ("do", "run", "perform", "carry out", "get me", "provide", "produce",
                 "deliver")
"""Verbs that take :data:`TASK_NOUNS` (``run a tissue segmentation``)."""

ADVERBS = ("quickly", "carefully", "also", "now", "first", "briefly", "properly", "fully",
           "then", "too", "as well", "automatically")
PLACES = ("on this scan", "for this series", "on the mri", "in this study", "for this patient",
          "on these images", "on this mri", "for this exam", "in this series", "on the images",
          "for this case", "on this study", "in the brain", "on the brain mri")
FILLERS = ("now", "also", "the", "this", "quickly", "carefully", "here", "today", "again",
           "kindly", "first", "mri", "images", "study", "exam", "routine", "ok", "please",
           "just", "really", "thanks", "urgently", "so", "sorry", "asap", "pls", "lot", "exactly",
           "got")
"""Words inserted at random in training text (the model learns to ignore them)."""

TARGET_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "lesion": (("lesion", "lesions"), ("abnormality", "abnormalities"),
               ("focal lesion", "focal lesions"), ("brain lesion", "brain lesions"),
               ("abnormal finding", "abnormal findings")),
    "wmh": (("white matter lesion", "white matter lesions"),
            ("white-matter hyperintensity", "white-matter hyperintensities"),
            ("wmh", "wmhs"), ("small vessel lesion", "small vessel lesions"),
            ("white matter hyperintensity", "white matter hyperintensities"),
            ("hyperintensity", "hyperintensities"),
            ("white-matter lesion", "white-matter lesions")),
    "mass": (("mass", "masses"), ("tumour", "tumours"), ("tumor", "tumors"),
             ("space-occupying lesion", "space-occupying lesions"),
             ("brain tumour", "brain tumours"), ("neoplasm", "neoplasms")),
}
TISSUE_WORDS: dict[str, tuple[str, ...]] = {
    "brain": ("brain", "total brain", "whole brain", "brain parenchyma", "intracranial"),
    "csf": ("csf", "cerebrospinal fluid", "cerebro-spinal fluid"),
    "grey matter": ("grey matter", "gray matter", "gm", "cortical grey matter"),
    "white matter": ("white matter", "wm", "cerebral white matter"),
}
DIAGNOSIS_NOUNS = ("diagnosis", "likely diagnosis", "most likely diagnosis",
                   "probable diagnosis", "working diagnosis", "impression", "overall impression",
                   "conclusion", "verdict", "classification", "diagnostic suggestion",
                   "suggested diagnosis")
STUDY_WORDS = ("scan", "study", "mri", "exam", "series", "case", "brain mri", "examination",
               "brain scan", "mr study")
DISEASE_WORDS = ("small vessel disease", "small-vessel disease", "microangiopathy",
                 "chronic small vessel ischaemia", "cerebral small vessel disease")

LOCATIONS = (
    ("", "any", "any"), (" in the {side} {lobe} lobe", None, None),
    (" in the {lobe} lobe", "any", None), (" on the {side} side", None, "any"),
    (" in the {side} hemisphere", None, "any"), (" in the cerebellum", "any", "cerebellum"),
    (" in the {side} cerebellar hemisphere", None, "cerebellum"),
    (" in the {side} {lobe} region", None, None), (" {lobe}ly", "any", None),
    (" on the {side}", None, "any"), (" in the {lobe} region", "any", None),
    (" in the {side} half of the brain", None, "any"),
    (" in the {side} cerebellum", None, "cerebellum"),
)
"""Location filters of presence/count questions (lexicon): text, side (``None``: drawn), lobe
(``None``: drawn)."""

# --------------------------------------------------------------------------- instruction templates

CLAUSE_FRAMES = (
    "{v} {o}", "{a} {v} {o}", "{v} {o} {p}", "{v} {o} {a}", "{a} {v} {o} {p}", "{v} {o} too",
    "{v} {o}, {a}", "{v} {p} {o}", "also {v} {o} {p}", "{v} all {o}", "{v} {o} for me",
    "{v} {o} if you can", "{v} {o} as needed", "{v} {o} as usual", "{v} {o} here",
    "{v} {o} {p} {a}",
)
"""How one task is asked for with a verb: ``{v}`` verb, ``{o}`` object, ``{a}`` adverb,
``{p}`` place."""
NOUN_FRAMES = (
    "{n}", "{n} {p}", "{n} as well", "{n}, please", "{n} too", "{a} {n}", "{n} {p} {a}",
    "{n} for this series",
)
"""How one task is asked for with a noun phrase (``{n}``)."""
GENERIC_FRAMES = (
    "{g} {n}", "{g} {n} {p}", "{g} {n} too", "{g} {n} {a}", "{a} {g} {n}", "{g} {n} for me",
    "{g} {n} if you can", "{g} {p} {n}",
)
"""Verb clauses of a generic verb (``{g}``) with a noun phrase."""
NOMINAL_WRAPPERS = (
    "{x}", "i'd like {x}", "i need {x}", "we want {x}", "requesting {x}", "{x} would be great",
    "what i need is {x}", "{x}, please", "i would like {x}", "please provide {x}",
    "could i have {x}", "we need {x}", "{x} is required", "can we get {x}",
    "looking for {x}", "{x} needed",
)
"""Requests made of noun phrases (``{x}``: the joined noun clauses)."""
WRAPPERS = (
    "{x}", "please {x}", "{x} please", "could you {x}", "{x} for this series",
    "i want you to {x}", "kindly {x}", "{x} on this mri", "task: {x}", "can you {x}",
    "we need you to {x}", "{x}, thanks", "go ahead and {x}", "just {x}", "{x} on this scan",
    "would you {x}", "{x} for this patient", "your task is to {x}", "{x}.", "i need you to {x}",
    "could you please {x}", "you should {x}", "make sure to {x}", "please could you {x}",
    "i would appreciate it if you could {x}", "the job is to {x}", "help me {x}",
    "we want you to {x}", "let's {x}", "i'm asking you to {x}", "it would help if you could {x}",
    "pls {x}", "hey, {x}", "hi, could you {x}", "hello, please {x}", "here is your task: {x}",
    "{x}, cheers", "i'd like you to {x}", "would you kindly {x}", "please {x} for me",
)
"""Request wrappers of verb clauses (politeness, framing)."""
CONNECTORS = (
    " and ", ", then ", "; also ", " as well as ", ", and ", " plus ", ", after that ",
    " and also ", " followed by ", ", ", " then ", "; ", " and then ", ", and afterwards ",
    ", next ", " & ", " and finally ", ", together with ", " along with ", "; then ",
    " & also ",
)
"""Between two clauses of a combined request."""
NOUN_CONNECTORS = (" and ", ", ", " plus ", " as well as ", " with ", " and also ",
                   " together with ", " along with ")
SUFFIXES = ("", "", "", ".", "!", ", thank you", ", cheers", " asap", " now", " for me",
            ", ok?", " please", " today", ", if possible", " when you can", ", thanks a lot",
            " straight away", " as soon as possible", ", much appreciated", " quickly",
            ", thx", " right away", " first thing", " soon")
"""Endings of instructions."""


def _clause(task: str, rng: random.Random, which: Split) -> str:
    """One verb clause asking for ``task`` (a verb-object pair of ``which``)."""
    if rng.random() < 0.2:
        return rng.choice(split(GENERIC_FRAMES, which)).format(
            n=rng.choice(TASK_NOUNS[task]), g=rng.choice(GENERIC_VERBS), a=rng.choice(ADVERBS),
            p=rng.choice(PLACES))
    verbs, objs = TASK_VERBS[task], TASK_OBJECTS[task]
    pairs = [(i, j) for i in range(len(verbs)) for j in range(len(objs))
             if pair_split(i, j, which)]
    i, j = rng.choice(pairs)
    return rng.choice(split(CLAUSE_FRAMES, which)).format(
        v=verbs[i], o=objs[j], a=rng.choice(ADVERBS), p=rng.choice(PLACES))


def _noun_clause(task: str, rng: random.Random, which: Split) -> str:
    return rng.choice(split(NOUN_FRAMES, which)).format(
        n=rng.choice(TASK_NOUNS[task]), a=rng.choice(ADVERBS), p=rng.choice(PLACES))


def _join(parts: list[str], rng: random.Random, connectors: Sequence[str]) -> str:
    body = parts[0]
    for p in parts[1:]:
        body += rng.choice(connectors) + p
    return body


def _request(tasks: list[str], rng: random.Random, which: Split,
             bad: list[str] | None = None) -> str:
    """A request for ``tasks`` (verb or noun clauses, wrapped), with ``bad`` clauses mixed in."""
    nominal = rng.random() < 0.25
    make = _noun_clause if nominal else _clause
    parts = [make(t, rng, which) for t in tasks] + list(bad or [])
    rng.shuffle(parts)
    if nominal:
        body = _join(parts, rng, split(NOUN_CONNECTORS, which))
        text = rng.choice(split(NOMINAL_WRAPPERS, which)).format(x=body)
    else:
        body = _join(parts, rng, split(CONNECTORS, which))
        text = rng.choice(split(WRAPPERS, which)).format(x=body)
    return text + rng.choice(split(SUFFIXES, which))


# --------------------------------------------------------------------------- out of scope

OOS_ORGANS = (
    "liver", "kidneys", "heart", "lungs", "spleen", "pancreas", "spine", "knee", "hip",
    "shoulder", "prostate", "bladder", "thyroid", "breast", "colon", "stomach", "aorta", "ankle",
    "wrist", "eyes", "teeth", "sinuses", "pelvis", "gallbladder", "ovaries", "uterus", "elbow",
    "hippocampus", "pituitary gland", "inner ear", "carotid arteries", "cervical spine",
    "lumbar spine", "kidney", "adrenal glands", "small bowel", "skull base", "orbits",
    "jaw", "neck", "chest", "abdomen", "foot", "hand", "rib cage", "femur", "lymph nodes",
    "optic nerves", "thalamus", "brainstem nuclei", "vertebrae", "coronary arteries", "skin",
    "muscles", "placenta", "fetus", "tonsils", "larynx", "oesophagus", "rectum", "testes",
)
OOS_FINDINGS = (
    "fractures", "pneumonia", "kidney stones", "appendicitis", "gallstones", "breast cancer",
    "lung nodules", "pulmonary embolism", "aneurysms", "arthritis", "scoliosis", "osteoporosis",
    "covid", "polyps", "herniated discs", "torn ligaments", "diabetes", "hypertension",
    "liver cirrhosis", "heart failure", "skin cancer", "dental caries", "sinusitis",
    "multiple sclerosis activity", "vasospasm", "hydrocephalus shunt failure", "a stroke",
    "coronary disease", "bleeding", "haemorrhage", "infarcts", "microbleeds", "ischaemia",
    "a brain bleed", "atrophy", "aneurysm rupture", "vascular malformations", "edema",
    "meningitis", "abscesses", "cysts", "calcifications", "metastases in the bones",
    "hernias", "blood clots", "dementia", "epilepsy", "concussion", "prostate cancer",
    "tuberculosis", "gout", "a pneumothorax", "an ectopic pregnancy", "sepsis",
)
OOS_QUANTITIES = (
    "ejection fraction", "blood pressure", "bone density", "heart rate", "patient's age",
    "patient's weight", "time", "date", "weather", "price", "cost of the scan",
    "radiation dose", "hippocampal volume", "cortical thickness", "brain age", "blood flow",
    "temperature", "patient's name", "referring doctor", "insurance number", "kidney function",
    "cholesterol", "oxygen saturation", "tumour grade", "liver volume", "heart volume",
    "perfusion", "diffusion coefficient", "fractional anisotropy", "glucose level",
    "spleen size", "lung volume", "ventricle size", "blood sugar", "body mass index",
    "tumour growth rate", "survival time", "life expectancy", "scan duration",
    "contrast dose", "heart size", "iq", "muscle mass",
)
OOS_DOCUMENTS = (
    "poem", "joke", "discharge letter", "invoice", "email to the family", "song", "story",
    "prescription", "referral letter", "insurance claim", "tweet", "shopping list",
    "cover letter", "essay", "sick note", "press release", "recipe", "consent form",
    "complaint", "thank-you note", "summary of the film", "novel", "speech", "menu",
)
OOS_MODALITIES = (
    "ct", "ct scan", "pet", "pet-ct", "x-ray", "chest x-ray", "ultrasound", "mammogram",
    "angiogram", "spect", "echocardiogram", "dexa scan", "fluoroscopy", "ecg", "eeg",
    "cone beam ct", "radiograph", "bone scan", "oct scan", "endoscopy", "colonoscopy",
    "cardiac mri", "spine mri", "knee mri", "dental x-ray", "ct angiogram", "biopsy slide",
    "ecg trace",
)
OOS_TREATMENTS = (
    "antibiotics", "steroids", "chemotherapy", "radiotherapy", "surgery", "aspirin",
    "an operation", "painkillers", "physiotherapy", "a biopsy", "thrombolysis", "insulin",
    "dexamethasone", "a stent", "anticoagulants", "statins", "a craniotomy", "immunotherapy",
    "morphine", "a shunt", "antiepileptics", "ibuprofen", "paracetamol", "a transfusion",
)
OOS_PATIENT_DATA = (
    "name", "date of birth", "address", "phone number", "patient id", "insurance number",
    "age", "email address", "social security number", "medical record number", "next of kin",
    "home address", "religion", "birthday", "family name", "weight",
)
OOS_ADMIN = (
    "delete the series", "send the study to the cloud", "email the results to the referrer",
    "change the patient name", "anonymise the images", "print the images",
    "book an appointment", "order a ct scan", "archive the study", "forward the images to "
    "dropbox", "call the patient", "cancel the exam", "export the data to excel",
    "upload the scan to google drive", "schedule a follow-up", "bill the insurance",
    "restart the server", "change the password", "merge the two patients", "burn a cd",
    "share the images on social media", "move the study to another pacs",
    "copy the series to a usb stick", "rename the study", "unlock the account",
    "notify the family", "fax the report", "turn off the scanner",
)
OOS_SENTENCES = (
    "write a poem", "tell me a joke", "play some music", "predict survival",
    "track the tumour over five years", "compare with last year's ct",
    "grade the glioma molecularly", "register the scan to another patient",
    "translate the report into french", "estimate the brain age", "count the vertebrae",
    "compute perfusion maps", "do my homework", "summarise the patient's history",
    "fix the scanner", "order pizza", "what is the meaning of life", "sing a song",
    "write the report in german", "predict the genetic mutation", "determine the idh status",
    "decide the treatment", "plan the radiotherapy", "calculate the dose",
    "clone the patient", "guess the patient's age", "draw a picture of a cat",
)
"""Whole out-of-scope requests (brain-adjacent ones too)."""
OOS_THINGS = (
    "the date", "the weather", "my car", "the coffee", "the printer", "the lights", "the bill",
    "the news", "the football scores", "the password", "the door", "the meeting",
    "the calendar", "the music", "the stock market", "the lottery numbers", "a holiday",
    "the schedule", "the budget", "the traffic", "a pizza", "the dog", "the garden", "my email",
    "the phone", "the time", "the laundry", "dinner", "the lunch menu", "the parking",
    "the train times", "the nurse", "the ward", "a taxi", "the waiting list", "the rota",
    "the invoice", "the weekend", "the wifi", "the elevator", "my keys", "the kettle",
    "the patient", "the family", "the insurance", "the referrer", "the hospital", "a friend",
)
"""Everyday things (out of scope whatever verb asks for them)."""
OOS_INSTRUCTION_FRAMES = (
    "{v} the {organ}", "{dv} {finding}", "measure the {quantity}", "write a {doc}",
    "reconstruct the {organ}", "{dv} {finding} in the {organ}", "compute the {quantity}",
    "{v} {obj} on the {mod}", "{v} {obj} in the {organ}", "estimate the {quantity}",
    "report on the {organ}", "diagnose {finding}", "{v} the {organ} on the {mod}",
    "draft a {doc}", "read the {mod}", "prescribe {treat}", "recommend {treat}",
    "{v} {obj} for the {organ}", "analyse the {mod}", "start {treat}", "{dv} {finding}",
    "plan {treat} for the {t}", "segment the {organ} tissues", "{v} {obj} on this {mod}",
    "treat the {t} with {treat}", "look at the {organ}", "give the dose of {treat}",
    "{v} the {quantity}", "{v} {obj} from the {mod}", "find the {organ}",
    "{nonsense}", "{v} the {nonsense}", "{admin}", "{sentence}", "{dv} {nonsense}",
    "{v} {obj} and {admin}", "interpret the {mod}", "decide whether to give {treat}",
    "{v} {obj} in the {organ} {nonsense}", "{nonsense} {v} {obj}",
    "{v} {thing}", "{dv} {thing}", "{v} {thing} {p}", "{v} the {pdata}", "{dv} the {quantity}",
    "{v} {thing} and {v} {obj}", "{v} the {quantity} {p}", "{v} {obj} for {thing}",
    "{v} the {pdata} {p}", "{dv} {thing} {p}", "{v} the patient's {pdata}",
    "{v} {thing} for this patient",
)
"""Out-of-scope instruction frames: ``{v}``/``{obj}`` an in-scope verb and object (the
out-of-scope part is elsewhere), ``{dv}`` a detection verb, the rest out-of-scope lexicon."""
OOS_QUESTION_FRAMES = (
    "any {finding}?", "is the {organ} normal?", "what is the {quantity}?", "how big is the "
    "{organ}?", "are there {finding}?", "does the patient have {finding}?",
    "do you see {finding}?", "what is the {quantity} of this patient?", "is there {finding}?",
    "how large is the {organ}?", "tell me the {quantity}", "is the {organ} enlarged?",
    "what is the patient's {pdata}?", "what does the {mod} show?", "is the {mod} normal?",
    "should the patient get {treat}?", "how should the {t} be treated?",
    "what is the {organ} volume?", "is there a {t} in the {organ}?", "what is the prognosis?",
    "how long will the patient live?", "what treatment do you recommend for the {t}?",
    "will the patient need {treat}?", "who is the patient?", "is the {t} malignant?",
    "how many {finding} are there?", "what dose of {treat} should be given?",
    "can you see {finding} on the {mod}?", "what's the {quantity}?", "{nonsense}?",
    "is the {t} cancer?", "is there a {t} on the {mod}?", "how old is the {t}?",
    "what is the {pdata} of the patient?", "what should we do about the {t}?",
    "is the patient fit for {treat}?", "how many {t}s are in the {organ}?",
    "what grade is the {t}?", "who referred this patient?", "where is the patient from?",
    "when was the scan done?", "what is the {t} made of?", "is the {organ} healthy?",
    "why is the {t} there?", "does the {organ} look ok?", "is {treat} needed?",
    "what's the weather today?", "what time is it?", "which hospital is this?",
    "what does the patient's {pdata} say?", "what caused the {t}?", "{nonsense} {nonsense}?",
)
"""Out-of-scope question frames (``{t}`` an in-scope lesion word: the question about it is not
one the model answers)."""

DETECT_VERBS = TASK_VERBS["detect abnormalities"]


def nonsense(rng: random.Random) -> str:
    """One made-up word (letters or syllables)."""
    if rng.random() < 0.5:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                       for _ in range(rng.randint(3, 10)))
    syl = ("ka", "lo", "mi", "zu", "tre", "bor", "fla", "nix", "qua", "pe", "dro", "sli",
           "ven", "gar", "ox", "ul", "ti", "bex", "rum", "sha", "plo", "wen", "yak", "zor")
    return "".join(rng.choice(syl) for _ in range(rng.randint(2, 4)))


def _oos_fill(frame: str, rng: random.Random, which: Split) -> str:
    task = rng.choice(TASKS)
    nons = " ".join(nonsense(rng) for _ in range(rng.choice((1, 1, 2, 3))))
    return frame.format(
        organ=rng.choice(split(OOS_ORGANS, which)), finding=rng.choice(split(OOS_FINDINGS, which)),
        quantity=rng.choice(split(OOS_QUANTITIES, which)),
        doc=rng.choice(split(OOS_DOCUMENTS, which)), mod=rng.choice(split(OOS_MODALITIES, which)),
        treat=rng.choice(split(OOS_TREATMENTS, which)),
        pdata=rng.choice(split(OOS_PATIENT_DATA, which)),
        admin=rng.choice(split(OOS_ADMIN, which)), sentence=rng.choice(split(OOS_SENTENCES, which)),
        thing=rng.choice(split(OOS_THINGS, which)), p=rng.choice(PLACES),
        v=rng.choice(TASK_VERBS[task]), obj=rng.choice(TASK_OBJECTS[task]),
        dv=rng.choice(DETECT_VERBS), t=rng.choice(rng.choice(TARGET_WORDS[rng.choice(TARGETS)])),
        nonsense=nons)


# --------------------------------------------------------------------------- questions

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "presence": (
        "is there a {t}{loc}?", "are there any {tp}{loc}?", "does this scan show a {t}{loc}?",
        "any {tp}{loc}?", "do you see a {t}{loc}?", "is a {t} present{loc}?",
        "has the patient got a {t}{loc}?", "can you find a {t}{loc}?",
        "is there evidence of a {t}{loc}?", "are {tp} present{loc}?",
        "does the mri show {tp}{loc}?", "is any {t} visible{loc}?",
        "do you find any {tp}{loc}?", "is there any {t}{loc}?", "are any {tp} seen{loc}?",
        "does the patient have a {t}{loc}?", "can you see any {tp}{loc}?",
        "is a {t} seen{loc}?", "does the study contain a {t}{loc}?", "are there {tp}{loc}?",
        "was a {t} detected{loc}?", "were any {tp} found{loc}?",
        "is there a {t} anywhere{loc}?", "do the images show a {t}{loc}?",
        "did you detect any {tp}{loc}?", "are {tp} visible{loc}?", "is a {t} visible{loc}?",
        "do we have a {t}{loc}?", "is there a single {t}{loc}?", "have any {tp} been found{loc}?",
        "could there be a {t}{loc}?", "does the scan contain {tp}{loc}?",
    ),
    "count": (
        "how many {tp} are there{loc}?", "count the {tp}{loc}", "number of {tp}{loc}?",
        "how many {tp} do you see{loc}?", "what is the number of {tp}{loc}?",
        "how many {tp}{loc}?", "how many {tp} can you find{loc}?", "give the count of {tp}{loc}",
        "tell me how many {tp} there are{loc}", "how many {tp} were detected{loc}?",
        "what is the count of {tp}{loc}?", "how many {tp} does the patient have{loc}?",
        "how many {tp} were found{loc}?", "how many {tp} are seen{loc}?",
        "count of {tp}{loc}?", "how many {tp} does the scan show{loc}?",
        "how many separate {tp} are there{loc}?", "total number of {tp}{loc}?",
        "how many {tp} are visible{loc}?", "how many {tp} in total{loc}?",
        "how many {tp} have been found{loc}?", "what number of {tp} is there{loc}?",
        "how many {tp} are detected{loc}?", "how many {tp} does the mri show{loc}?",
        "how many {tp} did you find{loc}?", "how many {tp} show up{loc}?",
        "how many {tp} does the study contain{loc}?", "give me the number of {tp}{loc}",
    ),
    "side": (
        "which side is the {t} on?", "is the {t} on the left or the right?",
        "what side is the largest {t}?", "on which side is the {t}?",
        "left or right: where is the {t}?", "which hemisphere has the {t}?",
        "which side is the biggest {t} on?", "which side has the {t}?",
        "is the {t} left-sided or right-sided?", "is the largest {t} on the left or right?",
        "what side of the brain is the {t} on?", "which hemisphere is the {t} in?",
        "on what side is the {t}?", "is the {t} left or right?",
        "which side is the largest {t} located on?", "what hemisphere contains the {t}?",
        "what hemisphere is the {t} in?", "is the {t} in the left or right hemisphere?",
        "which side of the brain has the {t}?", "on which side is the largest {t}?",
        "which hemisphere contains the {t}?", "is the {t} on the right or on the left?",
        "what side is the {t} on?", "left or right, which side is the {t}?",
    ),
    "lobe": (
        "which lobe is the {t} in?", "where is the {t}?", "in what lobe is the largest {t}?",
        "what lobe contains the {t}?", "where is the largest {t} located?",
        "which part of the brain has the {t}?", "in which lobe is the {t} located?",
        "where exactly is the {t}?", "which lobe has the {t}?", "where is the biggest {t}?",
        "what lobe is the {t} in?", "in which lobe is the largest {t}?",
        "what is the location of the {t}?", "which brain region contains the {t}?",
        "where in the brain is the {t}?", "which lobe is the largest {t} in?",
        "which lobe contains the {t}?", "what lobe has the largest {t}?",
        "where is the {t} situated?", "where does the {t} lie?", "in which lobe does the {t} lie?",
        "where is the largest {t} found?", "which lobe holds the {t}?",
        "what region of the brain contains the {t}?",
    ),
    "size": (
        "how big is the {t}?", "what is the size of the largest {t}?",
        "how large is the {t} in mm?", "what size is the {t}?", "how large is the largest {t}?",
        "what is the diameter of the {t}?", "how many mm across is the {t}?",
        "how many millimetres is the {t}?", "how big is the largest {t}?",
        "what does the {t} measure?", "how wide is the {t}?", "size of the {t}?",
        "what is the {t}'s diameter?", "how big is the {t} in millimetres?",
        "how large is the {t}?", "what is the size of the {t}?",
        "how many millimetres does the {t} measure?", "diameter of the largest {t}?",
        "how large is the biggest {t} in mm?", "what is the largest {t}'s size?",
        "what size is the largest {t}?", "how many millimetres across is the {t}?",
        "what is the diameter of the largest {t} in mm?", "how big is the biggest {t}?",
        "what are the dimensions of the {t}?", "how many mm is the largest {t}?",
        "what is the {t}'s size in millimetres?", "how wide is the largest {t}?",
    ),
    "diagnosis": (
        "what is the {dn}?", "what's the {dn}?", "is this {s} normal?", "what is your {dn}?",
        "what do you think this {s} shows?", "is the {s} normal or abnormal?",
        "does the patient have {dis}?", "what would be the {dn}?", "tell me the {dn}",
        "what disease does this {s} show?", "is the brain normal?", "what is the {dn} here?",
        "can you give a {dn}?", "{dn}?", "is there any disease?", "what is your {dn} of this {s}?",
        "is this a normal {s}?", "is this {dis}?", "what is the {dn} for this {s}?",
        "what do you make of this {s}?", "is the {s} abnormal?", "what's your {dn}?",
        "how would you classify this {s}?", "does this {s} show {dis}?",
        "what is the {dn} of the {s}?", "is this {s} normal or not?",
        "what condition does the {s} show?", "what is the {dn} for this patient?",
        "what would your {dn} be?", "what is the {dn} of this patient?",
        "how would you describe this {s}?", "what would you say this {s} shows?",
        "is this {s} abnormal?", "what is your {dn} for this {s}?",
        "how would you categorise this {s}?", "what is the overall {dn}?",
        "what is the {dn} in this {s}?", "what does this {s} look like to you?",
        "what is your {dn} here?", "what does the {s} suggest?",
    ),
    "volume": (
        "what is the {tissue} volume?", "how much {tissue} is there?",
        "total {tissue} volume in ml?", "what is the volume of the {tissue}?",
        "how large is the {tissue} volume?", "how many ml of {tissue} are there?",
        "how many millilitres of {tissue}?", "{tissue} volume?",
        "what volume of {tissue} was measured?", "tell me the {tissue} volume",
        "what is the total {tissue} volume?", "how big is the {tissue} volume?",
        "{tissue} volume in millilitres?", "what's the {tissue} volume?",
        "volume of the {tissue}?", "how much {tissue} does this brain have?",
        "what is the measured {tissue} volume?", "how many millilitres of {tissue} are there?",
        "what is the {tissue} volume in ml?", "how much {tissue} was segmented?",
        "how big is the total {tissue} volume?", "how much {tissue} does the patient have?",
        "what is the {tissue} volume of this brain?", "how much {tissue} volume is there?",
        "what is the {tissue} volume here?", "how many ml of {tissue} does this brain have?",
        "how big is the measured {tissue} volume?", "what volume does the {tissue} have?",
    ),
}
"""Question frames: ``{t}``/``{tp}`` a lesion word (singular/plural), ``{loc}`` a location
filter, ``{tissue}`` a tissue word, ``{dn}`` a diagnosis noun, ``{s}`` a study word, ``{dis}``
a disease name."""
INTERROGATIVES = frozenset(("what", "what's", "how", "which", "where", "is", "are", "does", "do",
                            "can", "has", "was", "were", "could", "did", "have", "on", "in",
                            "left", "who", "when", "why", "should", "will"))
"""First words of question frames that stay questions without a question mark (``white matter
volume`` without one could be an instruction: frames like it keep theirs)."""
QUESTION_PREFIXES = ("", "", "", "please, ", "quick question: ", "tell me, ", "doctor asks: ",
                     "question: ", "i wonder, ", "can you tell me: ", "one thing: ",
                     "sorry, ", "hi, ", "so, ", "and ", "ok, ")
"""Openings of questions."""


@dataclass(frozen=True)
class Example:
    """One text with the labels of every head (``IGNORE`` where a head does not apply)."""

    text: str
    intent: int
    tasks: tuple[int, ...] = (0, 0, 0, 0, 0)
    labels: dict[str, int] = field(default_factory=dict)
    """Single-label heads other than ``intent``: ``qtype``, ``target``, ``tissue``, ``side``,
    ``lobe``."""
    kind: str = ""
    """What generated it (``instruction``, ``question`` or the out-of-scope category)."""

    def label(self, head: str) -> int:
        """The class index of ``head`` (``IGNORE`` when it does not apply)."""
        return self.intent if head == "intent" else self.labels.get(head, IGNORE)


def bare_clause(task: str, rng: random.Random, which: Split) -> str:
    """``verb object`` alone (a verb-object pair of ``which``), as a config line often is."""
    verbs, objs = TASK_VERBS[task], TASK_OBJECTS[task]
    i, j = rng.choice([(i, j) for i in range(len(verbs)) for j in range(len(objs))
                       if pair_split(i, j, which)])
    return f"{verbs[i]} {objs[j]}"


def _instruction(rng: random.Random, which: Split) -> Example:
    n_tasks = rng.choice((1, 1, 1, 2, 2, 2, 3, 3, 4, 5))
    chosen = rng.sample(TASKS, n_tasks)
    if which == "train" and rng.random() < 0.15:  # bare: no wrapper, frame or ending (these
        # are training templates, so held-out text never is bare: evaluate scores bare
        # held-out pairs apart)
        text = _join([bare_clause(t, rng, which) for t in chosen], rng,
                     split(CONNECTORS, which))
    else:
        text = _request(chosen, rng, which)
    return Example(text, INTENTS.index("instruction"), tuple(int(t in chosen) for t in TASKS),
                   kind="instruction")


def _refused_instruction(rng: random.Random, which: Split) -> Example:
    bad = _oos_fill(rng.choice(split(OOS_INSTRUCTION_FRAMES, which)), rng, which)
    if rng.random() < 0.4:  # part of the request cannot be followed: the whole is refused
        good = rng.sample(TASKS, rng.choice((1, 1, 2)))
        return Example(_request(good, rng, which, bad=[bad]), INTENTS.index("refuse"),
                       kind="refused mixed request")
    text = rng.choice(split(WRAPPERS, which)).format(x=bad) + rng.choice(split(SUFFIXES, which))
    return Example(text, INTENTS.index("refuse"), kind="refused instruction")


def _question(rng: random.Random, which: Split) -> Example:
    qtype = rng.choice(QTYPES)
    frame = rng.choice(split(QUESTION_TEMPLATES[qtype], which))
    labels = {"qtype": QTYPES.index(qtype)}
    if qtype == "volume":
        tissue = rng.choice(TISSUES)
        labels["tissue"] = TISSUES.index(tissue)
        text = frame.format(tissue=rng.choice(TISSUE_WORDS[tissue]))
    elif qtype == "diagnosis":
        text = frame.format(dn=rng.choice(DIAGNOSIS_NOUNS), s=rng.choice(STUDY_WORDS),
                            dis=rng.choice(DISEASE_WORDS))
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
    if rng.random() < 0.15 and text.split()[0] in INTERROGATIVES:  # "how many masses"
        text = text.rstrip("?")
    text = rng.choice(split(QUESTION_PREFIXES, which)) + text
    return Example(text, INTENTS.index("question"), labels=labels, kind="question")


def _refused_question(rng: random.Random, which: Split) -> Example:
    text = _oos_fill(rng.choice(split(OOS_QUESTION_FRAMES, which)), rng, which)
    text = rng.choice(split(QUESTION_PREFIXES, which)) + text
    return Example(text, INTENTS.index("refuse"), kind="refused question")


DROPPABLE = frozenset(("the", "a", "please", "this", "for", "me", "on", "any", "all", "also",
                       "now", "too", "just", "kindly", "you", "of", "is", "are"))
"""Words a training text may lose (articles, politeness): the request stays the same."""


def augment(text: str, rng: random.Random) -> str:
    """A noisy variant of training ``text``.

    A filler inserted, an article or a polite word dropped; each sometimes. The words that
    carry the request are never replaced, and no word the model was not taught is made up: at
    run time a text with an unknown word (a typo too) is refused, naming the word
    (:func:`inference.omnimri.language.runtime.refusal_reason`).
    """
    words = text.split()
    if rng.random() < 0.4:
        words.insert(rng.randrange(len(words) + 1), rng.choice(FILLERS))
    drop = [k for k, w in enumerate(words) if w.lower() in DROPPABLE]
    if drop and len(words) > 3 and rng.random() < 0.3:
        del words[rng.choice(drop)]
    return " ".join(words)


MAKERS: tuple[tuple[float, Callable[[random.Random, Split], Example]], ...] = (
    (0.40, _instruction), (0.35, _question), (0.15, _refused_instruction),
    (0.10, _refused_question))
"""Share of each kind of example: 40 % instructions, 35 % questions, 25 % refusals."""


def generate(n: int, which: Split, seed: int, *, noisy: bool = False) -> list[Example]:
    """``n`` examples from the ``which`` templates, deterministic from ``seed``.

    :data:`MAKERS` shares; ``noisy``: 60 % of them through :func:`augment` (training).
    """
    rng = random.Random(f"{seed}-{which}")
    out = []
    for _ in range(n):
        r = rng.random()
        for p, make in MAKERS:
            if r < p:
                out.append(make(rng, which))
                break
            r -= p
        else:
            out.append(_refused_question(rng, which))
    if noisy:
        out = [Example(augment(e.text, rng), e.intent, e.tasks, e.labels, e.kind)
               if rng.random() < 0.6 else e for e in out]
    # capitalisation varies in real text (the tokenizer lowercases; kept for realism)
    return [Example(e.text[:1].upper() + e.text[1:], e.intent, e.tasks, e.labels, e.kind)
            if rng.random() < 0.3 else e for e in out]


TEMPLATE_LISTS: dict[str, Sequence[str]] = {
    "clause frames": CLAUSE_FRAMES, "noun frames": NOUN_FRAMES, "generic frames": GENERIC_FRAMES,
    "nominal wrappers": NOMINAL_WRAPPERS, "wrappers": WRAPPERS, "connectors": CONNECTORS,
    "noun connectors": NOUN_CONNECTORS, "suffixes": SUFFIXES,
    "question prefixes": QUESTION_PREFIXES,
    **{f"{q} questions": f for q, f in QUESTION_TEMPLATES.items()},
    "out-of-scope instructions": OOS_INSTRUCTION_FRAMES,
    "out-of-scope questions": OOS_QUESTION_FRAMES, "organs": OOS_ORGANS,
    "findings": OOS_FINDINGS, "quantities": OOS_QUANTITIES, "documents": OOS_DOCUMENTS,
    "modalities": OOS_MODALITIES, "treatments": OOS_TREATMENTS, "patient data": OOS_PATIENT_DATA,
    "administration": OOS_ADMIN, "out-of-scope sentences": OOS_SENTENCES,
    "everyday things": OOS_THINGS,
}
"""Every list split train/held-out by :func:`split` (the tests check none leaks)."""


def all_text(which: Split = "train") -> list[str]:
    """The tokenizer corpus (``which`` templates).

    The lexicon, the ``which`` templates and text generated from them, the report vocabulary.
    """
    from inference.omnimri.language.narrate import vocabulary_text

    text: list[str] = []
    for lex in [*TASK_VERBS.values(), *TASK_OBJECTS.values(), *TASK_NOUNS.values(),
                GENERIC_VERBS, ADVERBS, PLACES, FILLERS, DIAGNOSIS_NOUNS, STUDY_WORDS,
                DISEASE_WORDS, *TISSUE_WORDS.values()]:
        text += list(lex)
    for words in TARGET_WORDS.values():
        text += [w for pair in words for w in pair]
    text += list(SIDES) + list(LOBES)
    for items in TEMPLATE_LISTS.values():  # without the slot names
        text += [re.sub(r"\{\w+\}", " ", t) for t in split(items, which)]
    # the made-up words of out-of-scope text are not taught (the runtime refuses them)
    text += [e.text for e in generate(4000, which, seed=12345)
             if INTENTS[e.intent] != "refuse"]
    text += vocabulary_text()
    return text
