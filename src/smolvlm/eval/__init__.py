"""Evaluation: official-exact metrics (COCO captions, VQA, GQA/NLVR2 accuracy, retrieval recall),
readers for the benchmarks' own file formats, and the ``smolvlm score`` command.

Submodules are imported on demand so that ``import smolvlm.eval`` stays cheap:
``ptb_tokenizer``, ``caption_metrics``, ``vqa_metric``, ``accuracy``, ``retrieval``, ``readers``,
``score``.
"""
