"""The PEFT side of `ptuning bench --vs peft`: HF transformers' T5 with
`peft.PromptTuningConfig`, the same sizes and random batches as ours, timed in its own process
(`python -m ptuning.bench_peft --_peft_worker SPEC`, started by `bench.run_peft`; its last stdout
line is the JSON result), so that its peak RSS is its own and JAX holds no GPU memory meanwhile.
With `--paired` it is built first and then runs its steps one by one, in rounds with ours
(`bench_rounds.timed_steps`). Imports no JAX."""

from __future__ import annotations

import json
import os
import sys

from ptuning.bench import (_summary, peak_rss_bytes, prompt_tuning_step_flops, random_batches,
                           reset_peak_rss)
from ptuning.bench_rounds import timed_steps


def peft_worker(spec: dict) -> dict:
  """The PEFT side (runs in its own process): HF T5 + PromptTuningConfig, same sizes/batches."""
  import peft
  import torch
  import transformers
  from ptuning.checkpoints.hf import t5_config_to_hf_dict
  from ptuning.model.config import get_preset

  torch.set_num_threads(os.cpu_count())
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  rss_before = peak_rss_bytes()
  torch.manual_seed(0)
  cfg = get_preset(spec["model"]).replace(dropout_rate=0.0)
  hf_config = transformers.T5Config(**t5_config_to_hf_dict(cfg))
  with dev:  # initialised where it runs: an XL model built on the host takes minutes
    model = transformers.T5ForConditionalGeneration(hf_config)
  if not cfg.tie_embeddings:  # transformers 5 ties lm_head to shared at construction
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  model = peft.get_peft_model(model, peft.PromptTuningConfig(
      task_type="SEQ_2_SEQ_LM", num_virtual_tokens=spec["prompt"], num_transformer_submodules=1))
  model.to(dev).train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=0.3)
  autocast = torch.autocast(dev.type, torch.bfloat16, enabled=spec["dtype"] == "bfloat16")
  batches = [{k: torch.as_tensor(v, dtype=torch.long, device=dev) for k, v in b.items()}
             for b in random_batches(spec["warmup"] + spec["steps"], spec["batch"],
                                     spec["inputs"], spec["targets"], cfg.vocab_size)]
  losses = []
  build_rss = peak_rss_bytes()
  steps_rss = reset_peak_rss()

  def step(b):
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = model(input_ids=b["encoder_input_tokens"], attention_mask=torch.ones_like(
          b["encoder_input_tokens"]), decoder_input_ids=b["decoder_input_tokens"],
                   labels=b["decoder_target_tokens"]).loss
    loss.backward()
    optimizer.step()
    losses.append(loss.item())  # synchronises on GPU

  times = timed_steps(step, batches, spec["warmup"], spec.get("paired", False))
  flops = prompt_tuning_step_flops(cfg, spec["batch"], spec["inputs"], spec["targets"],
                                   spec["prompt"])
  out = _summary(times, flops, spec)
  out.update(torch=torch.__version__, transformers=transformers.__version__,
             peft=peft.__version__, threads=torch.get_num_threads(), device=str(dev),
             trainable_params=sum(p.numel() for p in trainable), rss_before_build=rss_before,
             peak_rss=max(build_rss, peak_rss_bytes()),
             steps_peak_rss=peak_rss_bytes() if steps_rss else None, loss=losses[-1],
             device_peak_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None)
  return out


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--_peft_worker":
    print(json.dumps(peft_worker(json.loads(sys.argv[2]))))
  else:
    raise SystemExit("usage: python -m ptuning.bench_peft --_peft_worker SPEC_JSON")
