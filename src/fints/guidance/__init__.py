"""Classifier-guided decoding (CLIPer, FUDGE): preference classifiers that reweight the
next-token distribution while the generator decodes.

``preferences``: what a request asks for; ``classifier``: a frozen causal-LM backbone
with a head giving p(class | prefix, v) for every candidate token v; ``library``: the
classifiers on disk, one folder each; ``processor``: the ``transformers``
``LogitsProcessor``; ``mode``: the generation mode (``fints.modes.MODES["guidance"]``);
``training`` and ``recipes``: training a head from labelled text.
"""
