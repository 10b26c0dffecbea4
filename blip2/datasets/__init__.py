"""The standard evaluation sets in their published file formats, read into typed records.

- :mod:`blip2.datasets.captions`: COCO captions (``captions_*.json``, also NoCaps), the Karpathy split
  as LAVIS ships it (``coco_karpathy_*.json``): images with their reference captions, for captioning and
  retrieval.
- :mod:`blip2.datasets.questions`: VQAv2 and OK-VQA (questions + annotations JSON), GQA (balanced
  questions JSON): questions with their human answers.
- :mod:`blip2.datasets.instructions`: A-OKVQA (questions with choices, direct answers and rationales) and
  LLaVA-Instruct (conversations about an image), for instruction tuning.

The loaders read only local files and never download anything: a missing file is a
:class:`DatasetError` naming the file, what it is, and where it comes from. They are plain Python (no
model, no Ray), so the evaluation job, the training reports and instruction-data builders share them.
"""
