"""promptsource-style Jinja templates: load, apply to raw examples, turn into SeqIO tasks/files.

A template is Jinja text whose rendering is split on `|||` into input and target (each
stripped), with `answer_choices` (a Jinja expression rendering to `a ||| b ||| ...`)
available inside it as a list, as in promptsource's `Template.apply`. `|||` inside example
values is protected while splitting. Rendering uses a sandboxed Jinja environment with
promptsource's extras (`zip`, filters `choice` (seeded per example), `most_frequent`).

promptsource's YAML files tag templates with Python types (`!Template`,
`!TemplateMetadata`); `load_templates` parses them with a `yaml.SafeLoader` subclass that
builds plain mappings for those two tags, so no Python object is ever constructed from YAML.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.sandbox
import seqio
import tensorflow as tf
import yaml

from tasks.sources import RecordsDataSource

SEPARATOR = "|||"
_PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's placeholder for `|||`
TRUNCATION_LENGTH = 2048  # promptsource truncates every substituted value to this many chars

Example = Mapping[str, Any]


class TemplateLoader(yaml.SafeLoader):
  """SafeLoader that reads promptsource's `!Template` / `!TemplateMetadata` as mappings."""


def _construct_mapping(loader: TemplateLoader, node: yaml.Node) -> dict[str, Any]:
  return loader.construct_mapping(node, deep=True)


TemplateLoader.add_constructor("!Template", _construct_mapping)
TemplateLoader.add_constructor("!TemplateMetadata", _construct_mapping)


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
  if not items:
    return None
  counts = collections.Counter(items).most_common()
  return [item for item, count in counts if count == counts[0][1]]


def _environment(rng: random.Random) -> jinja2.Environment:
  env = jinja2.sandbox.SandboxedEnvironment(loader=jinja2.BaseLoader())
  env.globals["zip"] = zip
  env.filters["choice"] = rng.choice
  env.filters["most_frequent"] = _most_frequent
  return env


def _protect(example: Example) -> dict[str, Any]:
  return {key: value.replace(SEPARATOR, _PIPE_PROTECTOR) if isinstance(value, str) else value
          for key, value in example.items()}


def _seed(example: Example) -> int:
  """A stable per-example seed for the `choice` filter (same example -> same rendering)."""
  return zlib.crc32(json.dumps(example, sort_keys=True, default=str).encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class Template:
  """One promptsource template: `jinja` (input `|||` target), optional `answer_choices`."""

  name: str
  jinja: str
  answer_choices_expr: str | None = None
  id: str = ""
  reference: str = ""
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def _render(self, source: str, example: Example, extra: Mapping[str, Any] | None = None) -> str:
    rng = random.Random(_seed(example))
    variables = _protect(example)
    variables.update(extra or {})
    try:
      return _environment(rng).from_string(source).render(**variables)
    except jinja2.TemplateError as e:
      raise ValueError(f"template {self.name!r}: {type(e).__name__}: {e}") from None

  def answer_choices(self, example: Example) -> list[str]:
    """The example's answer choices (`[]` if the template has none)."""
    if self.answer_choices_expr is None:
      return []
    rendered = self._render(self.answer_choices_expr, example)
    return [choice.strip().replace(_PIPE_PROTECTOR, SEPARATOR)
            for choice in rendered.split(SEPARATOR)]

  def apply(self, example: Example, truncate: bool = True) -> tuple[str, str]:
    """(input, target) of `example`; target "" when the rendering has no `|||` part.

    `truncate`: like promptsource, every `{{ ... }}` value is cut to `TRUNCATION_LENGTH`
    characters. Raises ValueError if `example` has a key `answer_choices` or the rendering
    holds more than one `|||`.
    """
    if "answer_choices" in example:
      raise ValueError("example contains the reserved key 'answer_choices'")
    source = self.jinja
    if truncate:
      source = source.replace("}}", f" | string | truncate({TRUNCATION_LENGTH}) }}}}")
    choices = self.answer_choices(example) if self.answer_choices_expr is not None else None
    rendered = self._render(source, example, {"answer_choices": choices})
    parts = [part.replace(_PIPE_PROTECTOR, SEPARATOR).strip()
             for part in rendered.split(SEPARATOR)]
    if len(parts) > 2:
      raise ValueError(f"template {self.name!r} rendered {len(parts) - 1} '|||' separators")
    return parts[0], parts[1] if len(parts) == 2 else ""


def template_from_dict(entry: Mapping[str, Any]) -> Template:
  """A `Template` from one parsed promptsource YAML entry (keys as in the YAML)."""
  missing = [key for key in ("name", "jinja") if key not in entry]
  if missing:
    raise ValueError(f"template entry lacks {missing}: {sorted(entry)}")
  return Template(name=str(entry["name"]), jinja=str(entry["jinja"]),
                  answer_choices_expr=entry.get("answer_choices"),
                  id=str(entry.get("id", "")), reference=str(entry.get("reference") or ""),
                  metadata=dict(entry.get("metadata") or {}))


def load_templates(yaml_path: str | os.PathLike) -> dict[str, Template]:
  """Templates of a promptsource `templates.yaml`, by template name (in file order)."""
  with open(yaml_path, encoding="utf-8") as f:
    document = yaml.load(f, Loader=TemplateLoader)  # noqa: S506 (a SafeLoader subclass)
  entries = (document or {}).get("templates") if isinstance(document, dict) else None
  if not isinstance(entries, dict):
    raise ValueError(f"{yaml_path}: no 'templates' mapping (promptsource format)")
  templates: dict[str, Template] = {}
  for key, entry in entries.items():
    if not isinstance(entry, dict):
      raise ValueError(f"{yaml_path}: template {key!r} is not a mapping")
    template = template_from_dict(entry)
    if template.name in templates:
      raise ValueError(f"{yaml_path}: two templates named {template.name!r}")
    templates[template.name] = template
  return templates


def read_raw_jsonl(path: str) -> Iterator[dict[str, Any]]:
  """Every JSON object of a jsonl file (blank lines skipped); errors name `path:lineno`."""
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object")
      yield record


RawExamples = Iterable[Example] | str | os.PathLike


def _raw_examples(raw: RawExamples) -> Iterable[Example]:
  if isinstance(raw, (str, os.PathLike)):
    return read_raw_jsonl(os.fspath(raw))
  return raw


def render_examples(raw: RawExamples, template: Template,
                    preprocess: Callable[[Example], Example] | None = None,
                    keep_empty_targets: bool = False) -> Iterator[dict[str, str]]:
  """`{"inputs", "targets"}` of each raw example (a sequence of dicts or a jsonl path).

  `preprocess` maps each raw example first (e.g. a string label to the class id the template
  indexes `answer_choices` with). Examples whose target renders empty (e.g. unlabelled rows
  under `{% if label != -1 %}`) are skipped unless `keep_empty_targets`.
  """
  for example in _raw_examples(raw):
    inputs, targets = template.apply(preprocess(example) if preprocess else example)
    if targets or keep_empty_targets:
      yield {"inputs": inputs, "targets": targets}


def _file_part(text: str) -> str:
  return re.sub(r"[^\w.-]", "_", text) or "None"


def write_xp3_file(raw: RawExamples, template: Template, root: str | os.PathLike, language: str,
                   dataset: str, subset: str | None = None, split: str = "train",
                   preprocess: Callable[[Example], Example] | None = None) -> str:
  """Writes rendered examples to `{root}/{lang}/xp3_{dataset}_{subset}_{split}_{template}.jsonl`.

  Lines carry `inputs`, `targets`, `language`, `split`, `template`, `dataset`, `config`, as
  xP3's files do, so `tasks.xp3.register_xp3_directory` picks them up. Returns the path.
  """
  folder = os.path.join(os.fspath(root), language)
  os.makedirs(folder, exist_ok=True)
  stem = "_".join(_file_part(part) for part in
                  ("xp3", dataset, subset or "None", split, template.name))
  path = os.path.join(folder, f"{stem}.jsonl")
  meta = {"language": language, "split": split, "template": template.name,
          "dataset": dataset, "config": subset}
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for example in render_examples(raw, template, preprocess):
      f.write(json.dumps({**example, **meta}, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def register_template_task(name: str, raw_splits: Mapping[str, RawExamples], template: Template,
                           vocabulary: seqio.Vocabulary,
                           preprocess: Callable[[Example], Example] | None = None,
                           metric_fns: Sequence[Callable[..., dict[str, float]]] = ()) -> str:
  """Registers a SeqIO task rendering `template` over raw examples; returns `name`.

  `raw_splits`: split -> raw examples (a list of dicts, re-iterable) or a jsonl path. Each
  example becomes `{"inputs", "targets"}` (see `render_examples`), tokenised with EOS like
  `ptuning.data.register_jsonl_task`, keeping `inputs_pretokenized`/`targets_pretokenized`.
  """
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    raise ValueError(f"a task or mixture named {name!r} is already registered")
  for split, raw in raw_splits.items():
    if isinstance(raw, Iterator):
      raise TypeError(f"split {split!r}: pass a list or a path, not a one-shot iterator")
  readers = {split: [lambda raw=raw: render_examples(raw, template, preprocess)]
             for split, raw in raw_splits.items()}
  signature = {key: tf.TensorSpec((), tf.string) for key in ("inputs", "targets")}
  features = {key: seqio.Feature(vocabulary=vocabulary, add_eos=True) for key in signature}
  seqio.TaskRegistry.add(
      name, source=RecordsDataSource(readers, signature), output_features=features,
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      metric_fns=list(metric_fns))
  return name
