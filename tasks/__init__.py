"""SeqIO task definitions for prompt research (nothing is registered on import).

- `xp3`: xP3-layout jsonl directories -> tasks per file/language, and mixtures
  (examples-proportional with a cap, temperature, per-language weights).
- `templates`: promptsource Jinja templates -> (input, target), template tasks, xP3 files.
- `glue`, `superglue`: T5's text-to-text GLUE/SuperGLUE tasks and `_rank` variants, from
  TFDS or the original files (`benchmark` holds the shared machinery, `metrics` T5's metrics,
  `rank` rank classification, `sources` a Python-reader SeqIO source).
- `ul2`: UL2's mixture of denoisers (R/X/S, mode tokens) as SeqIO preprocessors, tasks, mixture.
- `synthetic` (+ `synthetic_language`): deterministic synthetic xP3 data, text and vocabulary.
- `registry`: gin-callable registration (`@tasks.xp3_mixture()`, `@tasks.benchmark_task()`).
"""
