"""What a run is made of: mesh, frozen backbone, method, optimizer, shardings, jitted step.

`TrainConfig` is the one configurable (gin binds it at the edges, see ptuning/gin_bindings.py);
`build_experiment` turns it into concrete, sharded objects. Used by train, eval, infer and bench.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import optax

from ptuning import param_tree, sharding
from ptuning.checkpoints.load import load_backbone
from ptuning.checkpoints.train_state import TrainState
from ptuning.model import build
from ptuning.model.config import T5Config, get_preset
from ptuning.prompts import mode_token
from ptuning.prompts.method import PromptMethod
from ptuning.prompts.vanilla import PromptTuning
from ptuning.train import optim
from ptuning.train.step import StepSpec, init_train_state, make_train_step


@dataclasses.dataclass
class TrainConfig:
  """A run. Names follow T5X's gin macros where T5X has one (see gin_configs/runs/)."""

  model_dir: str
  mixture_or_task_name: str = ""
  task_feature_lengths: dict = dataclasses.field(
      default_factory=lambda: {"inputs": 256, "targets": 8})
  initial_checkpoint_path: str | None = None  # HF or T5X backbone; None: random (tests, bench)
  model: str | T5Config | None = None  # preset, checked against the checkpoint
  vocabulary_path: str | None = None
  method: PromptMethod | None = dataclasses.field(default_factory=PromptTuning)
  trainable_pattern: str | None = None  # default: the method's rule
  # UL2 paradigm token ('[NLU]', '[NLG]', '[S2S]'; '' = none), tokenised with
  # `vocabulary_path`, and its place: 'before_prompt' ([mode] [prompt] inputs) | 'after_prompt'
  # ([prompt] [mode] inputs); see ptuning/prompts/mode_token.py.
  mode_token: str = ""
  mode_token_position: str = "before_prompt"
  train_steps: int = 100
  batch_size: int = 32
  microbatches: int = 1
  optimizer: str = "adafactor"
  learning_rate: float = 0.3
  schedule: str = "constant"
  warmup_steps: int = 0
  optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
  # regex over trainable paths -> learning rate, e.g. DePT {'^prompt/lowrank_': 1e-4}; the
  # first matching regex wins, other leaves use `learning_rate` (same optimizer and schedule).
  group_learning_rates: dict = dataclasses.field(default_factory=dict)
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: Any = None
  dropout_rate: float = 0.0
  dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  # 'recompute' | 'plain' | 'cudnn' (flash attention on GPUs, ptuning/model/flash_attention.py);
  # None keeps the model's (its default: 'recompute').
  attention_impl: str | None = None
  # Each norm's output behind an optimization barrier (T5Config.norm_barrier): for GPUs, where XLA
  # would fuse the norm's scaling into every GEMM that reads it; bit-identical numbers on CPU.
  # None keeps the model's (its default: True).
  norm_barrier: bool | None = None
  mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
  # True: every process builds the same global batches, so a run (and its checkpoints) is the
  # same for any process count; False: SeqIO shards the examples over processes (data/batches.py).
  global_batches: bool = True
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  eval_every: int = 0  # 0: only at the end
  eval_mixture_or_task_name: str = ""  # default: the training task
  eval_split: str = "validation"
  eval_max_examples: int = 0  # 0: all
  decode_method: str = "greedy"
  max_decode_length: int = 0  # 0: task_feature_lengths['targets']

  def __post_init__(self):
    mode_token.check_position(self.mode_token_position)


@dataclasses.dataclass
class Experiment:
  config: TrainConfig
  mesh: jax.sharding.Mesh
  rules: Any
  model: T5Config
  method: PromptMethod | None
  rule: param_tree.TrainableRule
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  spec: StepSpec
  frozen: Any  # the frozen part of the full tree, sharded
  # Fresh trainable tree, sharded (used unless a checkpoint is restored). `init_state` donates it
  # to the train state and leaves its shape here (ShapeDtypeStructs with shardings): full
  # fine-tuning then holds one copy of the backbone, not two.
  trainable_init: Any
  state_shardings: Any
  frozen_shardings: Any
  backbone_path: str | None

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)

  def batch_shardings(self, batch: dict) -> dict:
    return {k: sharding.batch_sharding(self.mesh, self.rules, v.ndim) for k, v in batch.items()}

  @functools.cached_property
  def abstract_state(self) -> TrainState:
    return jax.eval_shape(functools.partial(init_train_state, optimizer=self.optimizer),
                          self.trainable_init)

  def init_state(self) -> TrainState:
    """The step-0 train state, built from `trainable_init`, which is donated (its buffers become
    the state's parameters) and replaced by its abstract shape: call this once per experiment."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.trainable_init)):
      raise ValueError("trainable_init is abstract: init_state was already called (it donates "
                       "the initial trainable tree) or the experiment is abstract")
    init = jax.jit(init_train_state, static_argnums=1, out_shardings=self.state_shardings,
                   donate_argnums=0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self.trainable_init)
    state = init(self.trainable_init, self.optimizer)
    self.trainable_init = abstract
    return state

  def train_step_fn(self, batch: dict):
    return make_train_step(self.spec, self.state_shardings, self.frozen_shardings,
                           self.batch_shardings(batch), self.replicated)

  def full_params(self, state: TrainState) -> Any:
    return param_tree.merge(state.params, self.frozen)


def _model_overrides(config: TrainConfig) -> dict:
  """Run-level numerics applied on top of the checkpoint's or preset's shapes."""
  overrides = dict(dropout_rate=config.dropout_rate, dtype=config.dtype,
                   scan_layers=config.scan_layers, remat_policy=config.remat_policy)
  if config.attention_impl is not None:
    overrides["attention_impl"] = config.attention_impl
  if config.norm_barrier is not None:
    overrides["norm_barrier"] = config.norm_barrier
  return overrides


@dataclasses.dataclass(frozen=True)
class _SlotOf:
  """Tags an optimizer-state leaf with the parameter (and sharding) it belongs to (a pytree leaf)."""

  param: Any  # ShapeDtypeStruct
  sharding: jax.sharding.NamedSharding


def _removed_axis(field: str | None, slot_shape: tuple, param_shape: tuple) -> int | None:
  """The parameter axis a factored slot lacks, or None.

  optax's Adafactor (`factorized._factored_dims`) factors the two largest axes, `d1, d0 =
  argsort(shape)[-2:]`: `v_row` is the mean over d0 (shape without d0) and `v_col` the mean over
  d1 (shape without d1). The field name settles square kernels, where both shapes agree.
  """
  candidates = [a for a in range(len(param_shape))
                if param_shape[:a] + param_shape[a + 1:] == tuple(slot_shape)]
  if len(param_shape) >= 2:
    d1, d0 = (int(a) for a in np.argsort(param_shape)[-2:])
    wanted = {"v_row": d0, "v_col": d1}.get(field or "")
    if wanted in candidates:
      return wanted
  return candidates[0] if len(candidates) == 1 else None


def _optimizer_state_shardings(optimizer, abstract_params, params_shardings, replicated):
  """Shardings of the optimizer state, following the parameters' shardings.

  A slot shaped like its parameter (Adam's mu / nu, Adafactor's unfactored `v`) takes the
  parameter's sharding. A slot that is the parameter minus one axis (Adafactor's factored
  `v_row` / `v_col`) takes the parameter's PartitionSpec minus that axis: for an `[embed, mlp]`
  kernel sharded `(None, 'model')`, v_row `[embed]` is `(None,)` and v_col `[mlp]` is
  `('model',)`. Everything else (step counts, `(1,)` placeholders) is replicated.
  `optax.multi_transform` (`group_learning_rates`) leaves `MaskedNode()`s for the parameters
  of other groups in each group's state: they hold no array and are kept as they are.
  """
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  not_param = object()
  masked = lambda x: isinstance(x, optax.MaskedNode)
  tag = lambda slot, p, s: slot if masked(slot) else _SlotOf(p, s)
  tags = optax.tree_map_params(optimizer, tag, abstract_state, abstract_params, params_shardings,
                               transform_non_params=lambda _: not_param, is_leaf=masked)

  def slot_sharding(path, slot, tag):
    if not isinstance(tag, _SlotOf):
      return replicated
    param_shape = tuple(tag.param.shape)
    if tuple(slot.shape) == param_shape:
      return tag.sharding
    field = next((k.name for k in reversed(path) if isinstance(k, jax.tree_util.GetAttrKey)), None)
    axis = _removed_axis(field, tuple(slot.shape), param_shape)
    if axis is None:
      return replicated
    spec = tuple(tag.sharding.spec) + (None,) * (len(param_shape) - len(tag.sharding.spec))
    return jax.sharding.NamedSharding(tag.sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec[:axis], *spec[axis + 1:]))

  return jax.tree_util.tree_map_with_path(slot_sharding, abstract_state, tags)


def _make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The configured optimizer; with `group_learning_rates`, one copy per learning-rate group."""
  if not config.group_learning_rates:
    return optim.make_optimizer(config.optimizer, schedule, **config.optimizer_kwargs)
  rules, patterns = {"default": optim.make_optimizer(config.optimizer, schedule,
                                                     **config.optimizer_kwargs)}, []
  for i, (pattern, lr) in enumerate(config.group_learning_rates.items()):
    group_schedule = optim.make_schedule(config.schedule, lr, config.warmup_steps,
                                         config.train_steps)
    rules[f"group_{i}"] = optim.make_optimizer(config.optimizer, group_schedule,
                                               **config.optimizer_kwargs)
    patterns.append((pattern, f"group_{i}"))
  return optim.multi_rate_optimizer(rules, patterns + [(".*", "default")])


def build_experiment(config: TrainConfig, devices=None, abstract: bool = False) -> Experiment:
  """Concrete, sharded run objects; `devices` defaults to every device. `abstract`: every
  array (backbone, method trees) is a ShapeDtypeStruct carrying its sharding, nothing is
  loaded or initialised (ahead-of-time plans; needs `config.model`, a preset or T5Config)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_for(config.mesh)
  overrides = _model_overrides(config)
  rng = jax.random.key(config.seed)
  mode = mode_token.tokenize(config.mode_token, config.mode_token_position,
                             config.vocabulary_path)
  if mode.ids:
    mode_token.check_method(config.method)
  if abstract:
    if config.model is None:
      raise ValueError("an abstract experiment (plan) needs MODEL, a preset name")
    model = (get_preset(config.model) if isinstance(config.model, str) else config.model)
    model = model.replace(**overrides)
    backbone = build.abstract_sharded_params(model, mesh, rules)
  elif config.initial_checkpoint_path:
    model, backbone = load_backbone(config.initial_checkpoint_path, mesh, config.model, rules,
                                    **overrides)
  else:
    if config.model is None:
      raise ValueError("set INITIAL_CHECKPOINT_PATH (a backbone checkpoint) or a model preset")
    model = (get_preset(config.model) if isinstance(config.model, str) else config.model)
    model = model.replace(**overrides)
    backbone = build.init_params(model, jax.random.fold_in(rng, 1), mesh, rules)
  backbone_shardings = build.param_shardings(model, mesh, rules)

  method = config.method
  full, full_shardings = {"backbone": backbone}, {"backbone": backbone_shardings}
  if method is not None:
    method_init = jax.jit(functools.partial(method.init),
                          out_shardings=sharding.logical_to_sharding(method.logical_axes(), mesh, rules))
    full.update((jax.eval_shape if abstract else lambda f, *a: f(*a))(
        method_init, jax.random.fold_in(rng, 2), backbone))
    full_shardings.update(sharding.logical_to_sharding(method.logical_axes(), mesh, rules))
  rule = param_tree.TrainableRule(config.trainable_pattern or
                                  (method.trainable_pattern if method else r"^backbone/"))
  trainable, frozen = param_tree.split(full, rule)
  trainable_shardings, frozen_shardings = param_tree.split(full_shardings, rule)

  schedule = optim.make_schedule(config.schedule, config.learning_rate, config.warmup_steps,
                                 config.train_steps)
  optimizer = _make_optimizer(config, schedule)
  replicated = sharding.replicated(mesh)
  abstract_trainable = jax.eval_shape(lambda t: t, trainable)
  state_shardings = TrainState(
      step=replicated, params=trainable_shardings,
      opt_state=_optimizer_state_shardings(optimizer, abstract_trainable, trainable_shardings,
                                           replicated))
  spec = StepSpec(model=model, method=method, optimizer=optimizer, z_loss=config.z_loss,
                  label_smoothing=config.label_smoothing,
                  loss_normalizing_factor=config.loss_normalizing_factor,
                  microbatches=config.microbatches, mode_token=mode)
  return Experiment(config=config, mesh=mesh, rules=rules, model=model, method=method, rule=rule,
                    optimizer=optimizer, schedule=schedule, spec=spec, frozen=frozen, trainable_init=trainable,
                    state_shardings=state_shardings, frozen_shardings=frozen_shardings,
                    backbone_path=config.initial_checkpoint_path)

