r"""PyTorch reference for the JAX benchmark: learn2learn-style second-order MAML.

Runs the workloads of ``advmaml/bench/benchmark.py`` (B1-B4, max-pool or strided
Conv4, 5-way 1-shot, synthetic uint8 images) the way a PyTorch user would
write them: a Python loop over the tasks of a meta-batch, per-task adapted
weights from ``torch.autograd.grad(..., create_graph=True)``, one backward
per task into the meta-parameters, then an Adam step.

  python benchmarks/pytorch_maml.py --all --output=results/benchmarks/pytorch-maxpool.json
  python benchmarks/pytorch_maml.py --all --model=strided --output=results/benchmarks/pytorch-strided.json
  python benchmarks/pytorch_maml.py --check     # quick correctness self-check

torch is not a project dependency (``pip install torch==2.13.0``, CPU wheel).
Images are NCHW here (NHWC in JAX); the networks and the work are the same.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

try:
  import torch
  import torch.nn.functional as F
except ImportError:
  sys.exit("pip install torch==2.13.0 (CPU wheel) to run the PyTorch baseline")

from advmaml.runtime.host import cpu_model, keep_freed_memory  # jax-free; the project is installed (pip install -e .)

N_WAY, K_SHOT, FILTERS, INNER_LR, OUTER_LR = 5, 1, 64, 0.4, 1e-3
PGD = dict(epsilon=0.1, step_size=0.025, steps=7)  # L-inf, uniform random start
WORKLOADS = {  # as advmaml/bench/benchmark.py; throughput unit per step: 1 meta-step or meta_batch tasks
    "B1": dict(kind="train", meta_batch=8, q_query=5, inner_steps=1, attack=False),
    "B2": dict(kind="train", meta_batch=32, q_query=15, inner_steps=1, attack=False),
    "B3": dict(kind="train", meta_batch=8, q_query=5, inner_steps=1, attack=True),
    "B4": dict(kind="adapt", meta_batch=32, q_query=15, inner_steps=10, attack=False),
}


def init_params(model: str, n_way: int = N_WAY, filters: int = FILTERS, side: int = 28,
                dtype=torch.float32, seed: int = 0) -> dict:
  """Conv4 parameters: conv{i} (F, C, 3, 3) glorot-uniform, no bias; norm{i}.{weight,bias} (F,);
  head.weight (n_way, F * s * s) with s = 1 (max-pool) or 2 (strided) for 28x28 input."""
  g = torch.Generator().manual_seed(seed)
  params, cin = {}, 1
  for i in range(4):
    bound = (6.0 / (9 * cin + 9 * filters)) ** 0.5
    params[f"conv{i}"] = (torch.rand(filters, cin, 3, 3, generator=g, dtype=dtype) * 2 - 1) * bound
    params[f"norm{i}.weight"] = torch.ones(filters, dtype=dtype)
    params[f"norm{i}.bias"] = torch.zeros(filters, dtype=dtype)
    side, cin = (-(-side // 2) if model == "strided" else side // 2), filters
  feat = filters * side * side
  params["head.weight"] = torch.randn(n_way, feat, generator=g, dtype=dtype) / feat ** 0.5
  params["head.bias"] = torch.zeros(n_way, dtype=dtype)
  return {k: v.requires_grad_() for k, v in params.items()}


def _same_pad(size: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' (low, high) padding of a 3x3 kernel, as advmaml.models._same_padding."""
  total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
  return total // 2, total - total // 2


def forward(params: dict, x: torch.Tensor, model: str) -> torch.Tensor:
  """Conv4 logits (B, n_way) of x (B, 1, 28, 28) under (possibly adapted) ``params``.

  Each block: 3x3 conv (max-pool: stride 1, pad 1; strided: stride 2, TF 'SAME'
  padding, asymmetric like the JAX model: 28->14->7->4->2), batch norm with the
  batch's own statistics (no running stats), ReLU, then 2x2 max-pool (max-pool
  variant: 28->14->7->3->1).
  """
  for i in range(4):
    if model == "strided":
      (t, b), (l, r) = _same_pad(x.shape[2], 2), _same_pad(x.shape[3], 2)
      x = F.conv2d(F.pad(x, (l, r, t, b)), params[f"conv{i}"], stride=2)
    else:
      x = F.conv2d(x, params[f"conv{i}"], padding=1)
    x = F.batch_norm(x, None, None, params[f"norm{i}.weight"], params[f"norm{i}.bias"],
                     training=True, eps=1e-5)
    x = F.relu(x)
    if model == "maxpool":
      x = F.max_pool2d(x, 2)
  return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def sample_task(pool: torch.Tensor, g: torch.Generator, q_query: int, dtype=torch.float32):
  """One N-way K-shot episode from pool (classes, examples, 28, 28) uint8: support x
  (N*K, 1, 28, 28), y (N*K,), query x (N*Q, 1, 28, 28), y (N*Q,); images in [0, 1]."""
  classes = torch.randperm(pool.shape[0], generator=g)[:N_WAY]
  idx = torch.rand(N_WAY, pool.shape[1], generator=g).argsort(1)[:, :K_SHOT + q_query]
  x = pool[classes[:, None], idx].to(dtype).div_(255.0).unsqueeze(2)  # (N, K+Q, 1, 28, 28)
  y = torch.arange(N_WAY)[:, None]
  split = lambda a, lo, hi: a[:, lo:hi].flatten(0, 1)
  return (split(x, 0, K_SHOT), split(y.expand(-1, K_SHOT), 0, K_SHOT),
          split(x, K_SHOT, None), split(y.expand(-1, q_query), 0, q_query))


def adapt(params: dict, x, y, model: str, steps: int, second_order: bool) -> dict:
  """``steps`` inner SGD steps (lr INNER_LR) on (x, y). Second order: the result stays
  differentiable w.r.t. ``params`` (create_graph); else each step's weights are detached."""
  for _ in range(steps):
    loss = F.cross_entropy(forward(params, x, model), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
    params = {k: p - INNER_LR * g for (k, p), g in zip(params.items(), grads)}
    if not second_order:
      params = {k: p.detach().requires_grad_() for k, p in params.items()}
  return params


def pgd_linf(params: dict, x, y, model: str, g: torch.Generator, epsilon: float,
             step_size: float, steps: int) -> torch.Tensor:
  """PGD-``steps`` L-inf attack (CE loss, uniform random start, box [0, 1]) on x (B, 1, H, W)
  against the constant ``params``; returns the detached x_adv (B, 1, H, W)."""
  params = {k: p.detach() for k, p in params.items()}
  noise = torch.rand(x.shape, generator=g, dtype=x.dtype) * (2 * epsilon) - epsilon
  x_adv = (x + noise).clamp(0, 1)
  for _ in range(steps):
    x_adv.requires_grad_()
    loss = F.cross_entropy(forward(params, x_adv, model), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    x_adv = torch.clamp(x_adv.detach() + step_size * grad.sign(), x - epsilon, x + epsilon).clamp(0, 1)
  return x_adv


def meta_loss(params, tasks, model, attack_g=None, backward=True) -> float:
  """Mean over tasks of the query loss after one second-order inner step (on PGD
  queries when attack_g is given); with backward, each task's share is backpropagated."""
  total = 0.0
  for sx, sy, qx, qy in tasks:
    fast = adapt(params, sx, sy, model, steps=1, second_order=True)
    if attack_g is not None:
      qx = pgd_linf(fast, qx, qy, model, attack_g, **PGD)
    loss = F.cross_entropy(forward(fast, qx, model), qy) / len(tasks)
    if backward:
      loss.backward()
    total = total + loss.detach()
  return float(total)


def make_step(work: dict, model: str, seed: int = 0):
  """() -> float: one meta-train step (loss) or one batch of test-time adaptations (accuracy)."""
  g = torch.Generator().manual_seed(seed)
  pool = torch.randint(0, 256, (64, 20, 28, 28), dtype=torch.uint8, generator=g)
  params = init_params(model)
  opt = torch.optim.Adam(params.values(), lr=OUTER_LR)

  def train_step():
    opt.zero_grad(set_to_none=True)
    tasks = [sample_task(pool, g, work["q_query"]) for _ in range(work["meta_batch"])]
    loss = meta_loss(params, tasks, model, attack_g=g if work["attack"] else None)
    opt.step()
    return loss

  def adapt_step():
    correct = 0.0
    for _ in range(work["meta_batch"]):
      sx, sy, qx, qy = sample_task(pool, g, work["q_query"])
      fast = adapt({k: p.detach().requires_grad_() for k, p in params.items()}, sx, sy, model,
                   work["inner_steps"], second_order=False)
      with torch.no_grad():
        correct += (forward(fast, qx, model).argmax(1) == qy).float().mean().item()
    return correct / work["meta_batch"]

  return (train_step if work["kind"] == "train" else adapt_step), params


def time_workload(name: str, model: str, repeats: int, min_steps: int, min_seconds: float) -> dict:
  """One warm-up step off the clock, then ``repeats`` runs of min_steps steps or min_seconds,
  whichever first (at least min(3, min_steps) steps), as advmaml.bench.benchmark.run_workload."""
  work = WORKLOADS[name]
  step, _ = make_step(work, model)
  step()
  rates = []
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while n < min(3, min_steps) or (n < min_steps and time.perf_counter() - t0 < min_seconds):
      step()
      n += 1
    rates.append(n / (time.perf_counter() - t0))
  per = work["meta_batch"] if work["kind"] == "adapt" else 1
  return {"workload": name + ("-strided" if model == "strided" else ""),
          "unit": "tasks/s" if work["kind"] == "adapt" else "meta-steps/s",
          "throughput_median": statistics.median(rates) * per,
          "throughput_min": min(rates) * per, "throughput_max": max(rates) * per,
          "settings": dict(work, model=model, n_way=N_WAY, k_shot=K_SHOT, filters=FILTERS,
                           inner_lr=INNER_LR, outer_lr=OUTER_LR, second_order=work["kind"] == "train",
                           pgd=PGD if work["attack"] else None)}


def self_check(model: str) -> None:
  """One B1-sized step at meta-batch 2 (finite loss, params change), then a float64
  central finite-difference check of one meta-gradient coordinate (tiny net, 4 filters)."""
  step, params = make_step(dict(WORKLOADS["B1"], meta_batch=2), model)
  before = {k: p.detach().clone() for k, p in params.items()}
  loss = step()
  assert loss == loss and abs(loss) < float("inf"), f"non-finite loss {loss}"
  changed = [k for k, p in params.items() if not torch.equal(p.detach(), before[k])]
  assert len(changed) == len(params), f"unchanged: {sorted(set(params) - set(changed))}"
  g = torch.Generator().manual_seed(1)
  pool = torch.randint(0, 256, (8, 4, 28, 28), dtype=torch.uint8, generator=g)
  tasks = [sample_task(pool, g, 2, torch.float64) for _ in range(2)]
  p64 = init_params(model, filters=4, dtype=torch.float64, seed=1)
  meta_loss(p64, tasks, model)
  analytic, h = p64["conv0"].grad[1, 0, 1, 2].item(), 1e-6
  values = []
  for sign in (1, -1):
    with torch.no_grad():
      p64["conv0"][1, 0, 1, 2] += sign * h
    values.append(meta_loss(p64, tasks, model, backward=False))
    with torch.no_grad():
      p64["conv0"][1, 0, 1, 2] -= sign * h
  numeric = (values[0] - values[1]) / (2 * h)
  assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (analytic, numeric)
  print(f"check ok ({model}): loss {loss:.4f}, all {len(params)} tensors updated; "
        f"d meta-loss / d conv0[1,0,1,2]: autograd {analytic:.8e}, finite difference {numeric:.8e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="", help=f"comma-separated, from {sorted(WORKLOADS)}")
  parser.add_argument("--all", action="store_true", help="run every workload")
  parser.add_argument("--model", choices=("maxpool", "strided"), default="maxpool")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--min_steps", type=int, default=20)
  parser.add_argument("--min_seconds", type=float, default=30.0)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--output", help="JSON output path (default: print only)")
  parser.add_argument("--check", action="store_true", help="run the quick self-check and exit")
  parser.add_argument("--keep_freed_memory", action="store_true",
                      help="glibc malloc reuses freed memory instead of page-faulting it afresh "
                      "(advmaml.runtime.host.keep_freed_memory; as advmaml's --keep_freed_memory)")
  args = parser.parse_args()
  kept = keep_freed_memory() if args.keep_freed_memory else False
  torch.set_num_threads(args.threads)
  if args.check:
    return self_check(args.model)
  names = sorted(WORKLOADS) if args.all else [n for n in args.config.split(",") if n]
  if not names or any(n not in WORKLOADS for n in names):
    parser.error(f"--config={args.config!r}: choose from {sorted(WORKLOADS)} or pass --all")
  if args.repeats < 1 or args.min_steps < 1 or args.min_seconds <= 0:
    parser.error("--repeats, --min_steps and --min_seconds must be positive")
  results = []
  for name in names:
    r = time_workload(name, args.model, args.repeats, args.min_steps, args.min_seconds)
    results.append(r)
    print(f"{r['workload']:<12} {r['throughput_median']:8.2f} {r['unit']:<12} "
          f"[{r['throughput_min']:.2f}-{r['throughput_max']:.2f}]", flush=True)
  record = {"framework": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": {"machine": platform.machine(), "processor": platform.processor(),
                        "cpu_model": cpu_model(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version()},
            "workloads": results, "settings": {"repeats": args.repeats, "min_steps": args.min_steps,
                                               "min_seconds": args.min_seconds,
                                               "keep_freed_memory": kept}}
  if args.output:
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
      json.dump(record, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(f.name, args.output)
  else:
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
  main()
