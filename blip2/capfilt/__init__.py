"""CapFilt (BLIP's captioning-and-filtering bootstrap) as a plain library: no Ray here.

Parts, in the order a record meets them:
- :mod:`.config`    — the job's typed config (input, validation, captioner, filter, output);
- :mod:`.readers`   — WebDataset / Parquet / COCO-style inputs, as shards of raw records;
- :mod:`.records`   — decoding and validation of one raw record: a clean row, or a rejection with a reason;
- :mod:`.models`    — the captioner (nucleus sampling, K captions per image) and the ITM filter, each a
  class that loads its weights once and maps a batch to a batch;
- :mod:`.select`    — which captions survive (threshold, then the best N);
- :mod:`.outputs`   — per-shard Parquet outputs, written atomically, with completion markers (resume);
- :mod:`.report`    — counts, the accounting invariant, score summary, filter precision/recall, histogram.

``pipelines/capfilt.py`` wires these into Ray Data; ``benchmarks/capfilt.py`` runs the same classes in
one process.
"""
