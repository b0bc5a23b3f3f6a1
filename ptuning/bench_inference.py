"""`ptuning bench --mode decode|score`: greedy decoding and rank scoring against transformers.

One random backbone from a preset (`build.init_params`) is written once as a Hugging Face
checkpoint (`write_hf_checkpoint`) by a small worker process;
transformers (`T5ForConditionalGeneration.from_pretrained`, float32, `torch.inference_mode()`,
CUDA when present) and ours (`load_backbone`, one device) both load that directory, so they run
the very same weights. Transformers runs first in its own process
(`python -m ptuning.bench_inference --_hf_worker SPEC`), so each process's peak RSS is its own and
JAX holds no GPU memory meanwhile; with `--paired` that process is built first and then runs its
batches in rounds with ours, alternating order (`ptuning.bench_rounds`), so the machine's drift
does not enter the ratio. Both time `warmup + steps` identical random batches (right-padded
rows of random lengths, first row full) and fetch every result to the host inside the timed step.

- decode: greedy, KV cache, exactly `T = --targets` new tokens per row. EOS stopping is off on
  both sides (ours `eos_id=-1`; theirs `generation_config.eos_token_id = None`), so nothing is
  suppressed and nothing stops early. Ours: one jit of encode + `decoding.greedy_decode` (a
  `lax.while_loop` over the cache). Theirs: `generate(max_new_tokens=T, min_new_tokens=T,
  do_sample=False, num_beams=1, use_cache=True)`. tokens/s = `B * T` generated tokens / second.
  Every batch's token ids are compared (a float near-tie may flip one; it is counted, not fatal).
- score (rank classification): `C = --candidates` targets `[B, C, T]` per input, summed
  log-likelihood of each. Both encode each input once and run the decoder over the `B * C`
  candidate rows (ours: one jit, the candidates of an input sharing its cross-attention keys
  and values, `EncoderDecoder.decode_logits`; theirs: the encoder, then one decoder forward
  with `encoder_outputs` repeated per candidate, log-softmax gathered at the targets).
  tokens/s = (`B * L` input + `B * C * T` target tokens, padding included) / second.
  Log-likelihoods are compared (max |difference|, and whether the chosen candidate agrees).

Like `ptuning.bench`, this module imports only the standard library at the top.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

from ptuning.bench import _gib, cpu_model_name, peak_rss_bytes, run_worker
from ptuning.bench_rounds import PeerProcess, paired_ratio, time_with_peer, timed_steps

MODES = ("decode", "score")
NO_EOS = -1  # an id no model produces: greedy decoding never stops early
SCORE_TOLERANCE = 1e-3  # max |ours - transformers| summed log-likelihood expected in float32
TOKENS_DEFINITION = {
    "decode": "generated tokens B*T per batch / seconds per batch",
    "score": "(B*L input + B*C*T candidate tokens, padding included) per batch / seconds per batch",
}


def weights_worker(spec: dict) -> dict:
  """Writes a random backbone of the preset (`build.init_params`, seed `spec['seed']`) as an HF
  checkpoint in `spec['checkpoint']`."""
  import jax
  from ptuning import sharding
  from ptuning.checkpoints.hf import write_hf_checkpoint
  from ptuning.model import build
  from ptuning.model.config import get_preset
  cfg = get_preset(spec["model"])
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  params = build.init_params(cfg, jax.random.key(spec["seed"]), mesh)
  write_hf_checkpoint(build.host_params(params), cfg, spec["checkpoint"])
  return {"checkpoint": spec["checkpoint"]}


def _padded_rows(rng, rows: int, length: int, min_length: int, vocab: int):
  """`[rows, length]` int32: random ids in [2, vocab) then EOS (1), right-padded with 0 to random
  lengths in [min_length, length]; row 0 is full."""
  import numpy as np
  lengths = rng.integers(min_length, length + 1, rows)
  lengths[0] = length
  out = np.zeros((rows, length), np.int32)
  for i, n in enumerate(lengths):
    out[i, :n - 1] = rng.integers(2, vocab, n - 1)
    out[i, n - 1] = 1
  return out


def make_batches(spec: dict, vocab: int) -> list[dict]:
  """`warmup + steps` batches: `inputs [B, L]`, and for score `candidates [B, C, T]` (int32)."""
  import numpy as np
  rng = np.random.default_rng(spec["seed"] + 1)
  b, length, t = spec["batch"], spec["inputs"], spec["targets"]
  batches = []
  for _ in range(spec["warmup"] + spec["steps"]):
    batch = {"inputs": _padded_rows(rng, b, length, max(2, length // 4), vocab)}
    if spec["mode"] == "score":
      c = spec["candidates"]
      rows = _padded_rows(rng, b * c, t, max(1, t // 2), vocab)
      batch["candidates"] = rows.reshape(b, c, t)
    batches.append(batch)
  return batches


def tokens_per_batch(spec: dict) -> int:
  """The tokens behind one batch's tokens/s (see `TOKENS_DEFINITION`)."""
  if spec["mode"] == "decode":
    return spec["batch"] * spec["targets"]
  return spec["batch"] * (spec["inputs"] + spec["candidates"] * spec["targets"])


def _summary(times: list[float], spec: dict) -> dict:
  median = statistics.median(times)
  return {"batch_s_median": median, "batch_s_min": min(times), "batch_s_max": max(times),
          "batch_s_all": times, "tokens_per_s": tokens_per_batch(spec) / median}


def hf_worker(spec: dict) -> dict:
  """The transformers side (its own process): same checkpoint, batches and outputs as ours."""
  import numpy as np
  import torch
  import transformers
  from transformers.modeling_outputs import BaseModelOutput

  transformers.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count())
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  rss_before = peak_rss_bytes()
  model = transformers.T5ForConditionalGeneration.from_pretrained(
      spec["checkpoint"], dtype=torch.float32).to(dev).eval()
  model.generation_config.eos_token_id = None  # decode exactly T tokens, as ours (NO_EOS)
  t, c = spec["targets"], spec.get("candidates")
  batches = []
  for batch in make_batches(spec, model.config.vocab_size):
    ids = torch.as_tensor(batch["inputs"], dtype=torch.long, device=dev)
    entry = {"ids": ids, "mask": (ids != 0).long()}
    if spec["mode"] == "score":
      targets = torch.as_tensor(batch["candidates"], dtype=torch.long, device=dev).view(-1, t)
      decoder_inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
      entry.update(targets=targets, decoder_inputs=decoder_inputs,
                   repeated_mask=entry["mask"].repeat_interleave(c, dim=0))
    batches.append(entry)
  outputs = []

  def decode(b):
    tokens = model.generate(input_ids=b["ids"], attention_mask=b["mask"], max_new_tokens=t,
                            min_new_tokens=t, do_sample=False, num_beams=1, use_cache=True)
    outputs.append(tokens[:, 1:].cpu().numpy())  # drop the decoder start token; synchronises

  def score(b):
    encoded = model.get_encoder()(input_ids=b["ids"], attention_mask=b["mask"]).last_hidden_state
    logits = model(encoder_outputs=BaseModelOutput(encoded.repeat_interleave(c, dim=0)),
                   attention_mask=b["repeated_mask"], decoder_input_ids=b["decoder_inputs"],
                   use_cache=False).logits
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, b["targets"][..., None])[..., 0]
    outputs.append((picked * (b["targets"] > 0)).sum(-1).view(-1, c).cpu().numpy())

  with torch.inference_mode():
    times = timed_steps(decode if spec["mode"] == "decode" else score, batches, spec["warmup"],
                        spec.get("paired", False))
  out = _summary(times, spec)
  out.update(torch=torch.__version__, transformers=transformers.__version__,
             threads=torch.get_num_threads(), device=str(dev), rss_before_build=rss_before,
             peak_rss=peak_rss_bytes(), outputs=np.stack(outputs).tolist(),
             untied_head=model.lm_head.weight is not model.shared.weight,
             device_peak_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None)
  return out


def make_decode_fn(cfg, max_new_tokens: int):
  """jit `(params, inputs [B, L]) -> greedy ids [B, max_new_tokens]` int32: encoder, then the
  cached greedy loop with EOS stopping off."""
  import jax
  from ptuning.model import decoding
  from ptuning.model.t5 import EncoderDecoder
  model = EncoderDecoder(cfg)

  @jax.jit
  def generate(params, inputs):
    encoded = model.apply({"params": params}, inputs, method=EncoderDecoder.encode)
    return decoding.greedy_decode(cfg, params, encoded, inputs > 0, max_new_tokens, NO_EOS)
  return generate


def make_rank_score_fn(cfg):
  """jit `(params, inputs [B, L], candidates [B, C, T]) -> summed log p(candidate) [B, C]` f32:
  `ptuning score`'s function (`scoring.make_score_fn`): each input encoded once, the decoder run
  over its `C` candidates, which share its cross-attention keys and values."""
  import jax
  from ptuning.scoring import make_score_fn
  score_rows = make_score_fn(cfg)

  @jax.jit
  def score(params, inputs, candidates):
    b, c, t = candidates.shape
    return score_rows(params, inputs, candidates.reshape(b * c, t)).reshape(b, c)
  return score


def bench_ours(spec: dict, peer: PeerProcess | None = None) -> dict:
  """Loads the checkpoint on one device, compiles once, times every batch (with a peer: each
  batch in a round with the peer's, alternating order); hardware included."""
  import jax
  import numpy as np
  from ptuning import sharding
  from ptuning.checkpoints.load import load_backbone

  device = jax.devices()[0]
  hardware = {"jax": jax.__version__, "backend": jax.default_backend(),
              "device_kind": device.device_kind, "devices_used": 1, "cpu": cpu_model_name(),
              "cores": os.cpu_count(), "platform": platform.platform()}
  rss_before = peak_rss_bytes()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), [device])
  cfg, params = load_backbone(spec["checkpoint"], mesh, spec["model"])
  fn = (make_decode_fn(cfg, spec["targets"]) if spec["mode"] == "decode"
        else make_rank_score_fn(cfg))
  keys = ("inputs",) if spec["mode"] == "decode" else ("inputs", "candidates")
  batches = [tuple(jax.device_put(b[k], device) for k in keys)
             for b in make_batches(spec, cfg.vocab_size)]
  start = time.perf_counter()
  compiled = fn.lower(params, *batches[0]).compile()
  compile_s = time.perf_counter() - start
  outputs = []

  def step(batch):
    outputs.append(np.asarray(compiled(params, *batch)))

  out = _summary(time_with_peer(step, batches, spec["warmup"], peer), spec)
  stats = device.memory_stats() or {}
  out.update(compile_s=compile_s, rss_before_build=rss_before, peak_rss=peak_rss_bytes(),
             device_peak_bytes=stats.get("peak_bytes_in_use"), outputs=np.stack(outputs))
  return {"hardware": hardware, "ours": out}


def compare(mode: str, ours, theirs) -> dict:
  """decode: differing token ids (and rows); score: max |difference| and rank agreement."""
  import numpy as np
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  if mode == "decode":
    differ = ours != theirs
    return {"token_mismatches": int(differ.sum()), "tokens_compared": int(differ.size),
            "rows_differing": int(differ.any(axis=-1).sum()), "rows": int(differ[..., 0].size)}
  return {"max_abs_diff": float(np.max(np.abs(ours - theirs))),
          "rank_agreement": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
          "examples": int(ours[..., 0].size)}


def _row(name: str, r: dict) -> str:
  device = _gib(r["device_peak_bytes"]) if r.get("device_peak_bytes") else "n/a"
  return (f"{name:<14}{r['batch_s_median']:>12.4f}{r['batch_s_min']:>10.4f}"
          f"{r['tokens_per_s']:>12,.0f}{r['peak_rss'] / 2**30:>14.2f}{device:>14}")


def _check_line(mode: str, check: dict) -> str:
  if mode == "decode":
    note = ("" if not check["token_mismatches"] else
            " -- a float near-tie flipped a greedy choice; its row diverges from there")
    return (f"check: {check['token_mismatches']} of {check['tokens_compared']} generated token ids "
            f"differ ({check['rows_differing']} of {check['rows']} rows){note}")
  note = ("" if check["max_abs_diff"] < SCORE_TOLERANCE else
          f" -- ABOVE the {SCORE_TOLERANCE:g} tolerance")
  return (f"check: max |delta log-likelihood| {check['max_abs_diff']:.2e}; same top candidate in "
          f"{check['rank_agreement']} of {check['examples']} examples{note}")


def run(args) -> int:
  """`bench --mode decode|score`: prints config, hardware, both rows and the ratio; `--json`."""
  if args.dtype != "float32" or args.mesh or args.vs or args.method != "prompt_tuning":
    raise SystemExit(f"--mode {args.mode} compares float32 on one device with transformers: "
                     "drop --dtype / --mesh / --vs / --method")
  spec = {k: getattr(args, k) for k in ("mode", "model", "batch", "inputs", "targets", "steps",
                                        "warmup", "paired")}
  if args.mode == "score":
    spec["candidates"] = args.candidates
  spec.update(dtype="float32", seed=0)
  what = (f"greedy, KV cache, exactly {spec['targets']} new tokens (EOS stopping off on both sides)"
          if args.mode == "decode" else
          f"rank classification: {args.candidates} candidates of {spec['targets']} tokens per input,"
          " encoder once per input")
  print("config: " + " ".join(f"{k}={v}" for k, v in spec.items()) + f" | {what}", flush=True)
  load_average = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="ptuning-bench-") as tmp:
    spec["checkpoint"] = tmp
    run_worker("ptuning.bench_inference", "--_weights_worker", spec)
    # transformers first, in its own process, while this one holds no JAX memory; or, --paired,
    # built first and then running its batches in rounds with ours (both models held at once).
    if not args.paired:
      theirs = run_worker("ptuning.bench_inference", "--_hf_worker", spec)
      result = bench_ours(spec)
    else:
      peer = PeerProcess("ptuning.bench_inference", "--_hf_worker", spec)
      try:
        result = bench_ours(spec, peer)
        theirs = peer.result()
      finally:
        peer.close()
  del spec["checkpoint"]
  hw, ours = result["hardware"], result["ours"]
  hw["load_average"] = load_average
  check = compare(args.mode, ours.pop("outputs"), theirs.pop("outputs"))
  ratio = theirs["batch_s_median"] / ours["batch_s_median"]
  print(f"hardware: jax {hw['jax']} {hw['backend']} backend, 1 x {hw['device_kind']} | CPU: "
        f"{hw['cpu']} | {hw['cores']} cores | load average {load_average:.2f}")
  what = ("encode + greedy_decode" if args.mode == "decode" else
          "encode + score, candidates sharing cross-attention keys/values")
  print(f"ours: one jit ({what})"
        f" | compile {ours['compile_s']:.1f} s | peak RSS {_gib(ours['peak_rss'])} "
        f"({_gib(ours['rss_before_build'])} after imports)")
  call = (f"generate(max_new_tokens={spec['targets']}, min_new_tokens={spec['targets']}, "
          "num_beams=1, do_sample=False, use_cache=True)" if args.mode == "decode" else
          "encoder once + decoder over candidates (encoder_outputs)")
  print(f"transformers: {theirs['transformers']}, torch {theirs['torch']} ({theirs['threads']} "
        f"threads, {theirs['device']}), float32, inference_mode, {call} | peak RSS "
        f"{_gib(theirs['peak_rss'])} ({_gib(theirs['rss_before_build'])} after imports)")
  print(f"tokens/s = {TOKENS_DEFINITION[args.mode]} = {tokens_per_batch(spec):,} tokens")
  print(f"\n{'impl':<14}{'s/batch med':>12}{'min s':>10}{'tokens/s':>12}{'peak RSS GiB':>14}"
        f"{'device peak':>14}")
  print(_row("ours", ours))
  print(_row("transformers", theirs))
  print(f"speed ratio ours / transformers: {ratio:.2f}")
  paired = (paired_ratio(theirs["batch_s_all"], ours["batch_s_all"]) if args.paired else None)
  if paired is not None:
    print(f"speed ratio, median of {len(ours['batch_s_all'])} paired rounds (alternating order): "
          f"{paired:.3f}")
  print(_check_line(args.mode, check))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": spec, "hardware": hw, "tokens_per_s_definition":
                 TOKENS_DEFINITION[args.mode], "ours": ours, "transformers": theirs,
                 "ratio_ours_over_transformers": ratio,
                 "ratio_ours_over_transformers_paired": paired, "check": check}, f, indent=2)
  return 0


def add_arguments(p) -> None:
  """The options only decode / score use (the rest are `ptuning.bench`'s)."""
  p.add_argument("--candidates", type=int, default=2,
                 help="score mode: candidate targets per input (C)")


WORKERS = {"--_weights_worker": weights_worker, "--_hf_worker": hf_worker}

if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in WORKERS:
    raise SystemExit(f"usage: python -m ptuning.bench_inference {{{'|'.join(WORKERS)}}} SPEC_JSON"
                     " (run `ptuning bench --mode decode|score` instead)")
  print(json.dumps(WORKERS[sys.argv[1]](json.loads(sys.argv[2]))))
