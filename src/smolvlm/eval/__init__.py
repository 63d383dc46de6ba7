"""Evaluation: official-exact metrics (COCO captions, VQA, GQA/NLVR2 accuracy, retrieval recall),
readers for the benchmarks' own file formats, the ``smolvlm score`` command and the ``smolvlm eval`` command.

Submodules are imported on demand so that ``import smolvlm.eval`` stays cheap:

- metrics: ``ptb_tokenizer``, ``caption_metrics``, ``vqa_metric``, ``accuracy``, ``retrieval``
- data: ``readers`` (the benchmarks' files), ``tasks`` (the task registry and each task's examples)
- running a model: ``options`` (EvalOptions), ``predict`` (answers, captions, retrieval scores),
  ``run_folder`` (resumable predictions, result files), ``runner`` (run and score a task, the shapes suite)
- commands: ``score`` (``smolvlm score``), ``cli`` (``smolvlm eval``)
"""
