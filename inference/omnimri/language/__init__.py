"""OmniMRI's language half: free-text instructions, questions about a series, natural reports.

* :mod:`.corpus` - the project's own text: paraphrases of the five instructions and their
  combinations, questions with slots, out-of-scope requests; train and *held-out* templates.
* :mod:`.textmodel` - tokenizer (``tokenizers`` WordPiece) and a tiny BERT text encoder
  (``transformers``, configured from scratch) with routing and question-parsing heads; training
  and ONNX export (needs the ``train`` extra: torch).
* :mod:`.runtime` - the served text encoder on ONNX Runtime: instruction routing and refusal,
  question parsing.
* :mod:`.facts` / :mod:`.qa` - the structured findings of a series and answers computed from
  them (never from the text model).
* :mod:`.narrate` - reports in varied natural sentences, grounded on the structured findings.
* :mod:`.evaluate` - the issue #16 targets on held-out phrasings.
"""
