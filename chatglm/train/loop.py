# The loop every method shares. A method hands it an objective: an nn.Module whose forward(batch) returns a dict
# with "loss" (the scalar to minimise), "tokens" (for tokens/s) and any other numbers to log. The loop owns the
# rest: seeding, AdamW over the parameters that require grad, linear warmup then cosine decay to 10%, several
# processes under torchrun (every rank takes its share of each batch and the gradients are averaged with
# all_reduce, so all ranks hold the same weights) or a DeepSpeed engine from a ZeRO config, a tqdm bar (loss, lr,
# tokens/s, ETA), metrics as JSONL and a PNG of the curves, a checkpoint every N steps, resume, Ctrl-C saves.
# The batch of step s depends only on s and the seed, so a resumed run continues bit-identically.
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class LoopConfig:
    out: str
    steps: int = 100
    batch_size: int = 8           # rows per step over all processes
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "cosine"      # after warmup: cosine to 10% at `steps`, rsqrt (1/sqrt(step), independent of
                                  # `steps`: a long run's step k is a run of k steps), or constant
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0           # 0: only at the end
    resume: bool | str = False    # True: the latest checkpoint under out; or a checkpoint folder
    deepspeed: str | None = None  # a DeepSpeed JSON config (configs/ds_zero2.json, ds_zero3.json)
    fsdp: str | None = None       # a PyTorch FSDP JSON config (configs/fsdp.json): shards every decoder layer
    progress: bool = True
    check_ranks: bool = False     # each rank writes rank{N}.json: a digest of every trainable parameter


class ResumeError(ValueError):
    pass


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size), starting the process group when torchrun launched several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The rows of step `step`: epochs are seeded permutations of the n rows, walked batch_size at a time; rank r
    takes rows r, r + world, ... of the batch."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    rows = [perm[(i * batch_size + j) % n] for j in range(batch_size)]
    return rows[rank::world]


class TokenBatches:
    """Batches of about batch_tokens tokens (padding included) instead of a fixed row count: each epoch is a seeded
    permutation cut into pools of `pool` rows, each pool sorted by length and cut into batches, the batches of an
    epoch shuffled. Rows of like length share a batch, so a corpus of mixed lengths wastes little on padding. As
    with batch_indices, the rows of step s depend only on s and the seed."""

    def __init__(self, lengths: list[int], batch_tokens: int, seed: int, pool: int = 1024):
        if max(lengths) > batch_tokens:
            raise ValueError(f"batch_tokens={batch_tokens} is less than the longest row ({max(lengths)} tokens)")
        self.lengths, self.batch_tokens, self.seed, self.pool = lengths, batch_tokens, seed, pool
        self.epochs: list[list[list[int]]] = []

    def _epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        batches = []
        for c in range(0, len(perm), self.pool):
            part = sorted(perm[c:c + self.pool], key=lambda i: self.lengths[i])
            batch = []
            for i in part:  # ascending lengths: the row being added is the batch's longest
                if batch and (len(batch) + 1) * self.lengths[i] > self.batch_tokens:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            batches.append(batch)
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        epoch = 0
        while True:
            while len(self.epochs) <= epoch:
                self.epochs.append(self._epoch(len(self.epochs)))
            if step < len(self.epochs[epoch]):
                return self.epochs[epoch][step][rank::world]
            step -= len(self.epochs[epoch])
            epoch += 1


def lr_lambda(cfg: LoopConfig):
    if cfg.schedule not in ("cosine", "rsqrt", "constant"):
        raise ValueError(f"schedule must be cosine, rsqrt or constant, got {cfg.schedule!r}")

    def f(step):
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
        if cfg.schedule == "rsqrt":
            return min(warm, math.sqrt(max(cfg.warmup, 1) / (step + 1)))
        if cfg.schedule == "constant":
            return warm
        t = min(step, cfg.steps) / max(1, cfg.steps)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return f


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def train(objective: nn.Module, batch_for: Callable[[int, int, int], dict], cfg: LoopConfig, identity: dict,
          save: Callable[[Path], None], evaluate: Callable[[int], dict] | None = None, eval_every: int = 0) -> dict:
    """Runs cfg.steps steps of objective(batch_for(step, rank, world)). identity names the method and model (a
    checkpoint of another is refused on resume); save(folder) writes the method's artifacts (adapter, prefix,
    model) into a checkpoint folder and, at the end, into cfg.out. Returns the last step's metrics."""
    rank, world = distributed()
    out = Path(cfg.out)
    params = trainable(objective)
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine = None
    if cfg.deepspeed and cfg.fsdp:
        raise ValueError("choose one of deepspeed and fsdp")
    if cfg.deepspeed:
        engine = deepspeed_engine(objective, opt, sched, cfg, world)
    if cfg.fsdp:
        if cfg.resume:
            raise ValueError("resume is not supported with fsdp (use a DeepSpeed ZeRO config)")
        objective = fsdp_wrap(objective, cfg)
        params = trainable(objective)  # FSDP's views of the same parameters
        opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = 0
    if cfg.resume:
        start = load_checkpoint(find_checkpoint(out, cfg.resume), objective, opt, sched, identity, engine)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        keep = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() and start else [])
                if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in keep))
    bar = progress(cfg, start, rank)
    step, last, t0, tokens = start, {}, time.time(), 0
    try:
        while step < cfg.steps:
            objective.train()
            batch = batch_for(step, rank, world)
            result = engine(batch) if engine else objective(batch)
            if engine:
                engine.backward(result["loss"])
                engine.step()
            else:
                opt.zero_grad(set_to_none=True)
                result["loss"].backward()
                if world > 1 and not cfg.fsdp:  # FSDP reduces (and shards) the gradients itself
                    average_gradients([p for _, p in params], world)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
                opt.step()
                sched.step()
            step += 1
            tokens += int(result.get("tokens", 0)) * world
            last = {"step": step, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens / max(time.time() - t0, 1e-9),
                    **{k: mean_over_ranks(v, world) for k, v in result.items() if k != "tokens"}}
            if evaluate and eval_every and step % eval_every == 0:
                last.update({f"eval_{k}": v for k, v in evaluate(step).items()})
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(out / f"checkpoint-{step}", step, objective, opt, sched, identity, save, rank, engine)
    except KeyboardInterrupt:
        folder = out / f"checkpoint-{step}"
        save_checkpoint(folder, step, objective, opt, sched, identity, save, rank, engine)
        if rank == 0:
            print(f"\ninterrupted at step {step}: saved {folder}; continue with --resume", flush=True)
        raise SystemExit(130) from None
    finally:
        if bar is not None:
            bar.close()
    save_checkpoint(out / f"checkpoint-{step}", step, objective, opt, sched, identity, save, rank, engine)

    def finish():  # on every rank: gathering ZeRO-3's partitions is collective
        if cfg.check_ranks:
            digests = {n: hashlib.sha1(p.detach().cpu().numpy().tobytes()).hexdigest()
                       for n, p in trainable(objective)}  # inside gathered: FSDP's full weights
            (out / f"rank{rank}.json").write_text(json.dumps(digests, indent=0))
        if rank == 0:
            save(out)
    gathered(objective, engine, finish)
    if rank == 0:
        plot_curves(metrics_path, out / "curves.png")
    return last


def progress(cfg: LoopConfig, start: int, rank: int):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.steps, initial=start, desc=Path(cfg.out).name, dynamic_ncols=True)


def average_gradients(params, world: int):
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def mean_over_ranks(v, world: int) -> float:
    v = float(v.detach()) if torch.is_tensor(v) else float(v)
    if world > 1:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t)
        v = float(t) / world
    return v


# ---------------------------------------------------------------- DeepSpeed

def deepspeed_engine(objective, opt, sched, cfg: LoopConfig, world: int):
    """A DeepSpeed engine over the objective from a ZeRO config; batch sizes and clipping come from LoopConfig."""
    import deepspeed
    ds = json.loads(Path(cfg.deepspeed).read_text())
    for half in ("bf16", "fp16"):  # "auto" as in transformers' configs: bf16 where the GPU has it
        if ds.get(half, {}).get("enabled") == "auto":
            ds[half]["enabled"] = half == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} processes")
    ds.update(train_batch_size=cfg.batch_size, train_micro_batch_size_per_gpu=cfg.batch_size // world,
              gradient_accumulation_steps=1, gradient_clipping=cfg.grad_clip)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched, config=ds,
                                      model_parameters=[p for _, p in trainable(objective)])
    return engine


def fsdp_wrap(objective, cfg: LoopConfig):
    """PyTorch FSDP2 (fully_shard) over the objective, in place: each decoder layer its own shard unit, the rest
    (embeddings, output layer) the root's. Config keys: sharding_strategy (FULL_SHARD; SHARD_GRAD_OP: weights stay
    gathered from forward to backward; NO_SHARD: every rank holds all of them, gradients all-reduced),
    mixed_precision (bf16, fp16 or null; CUDA only: on CPU the run stays float32). Runs on CPU with gloo too, where
    FSDP v1 (FullyShardedDataParallel) refuses to start ("FSDP needs a non-CPU accelerator device")."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..models import glm, glm2
    conf = json.loads(Path(cfg.fsdp).read_text())
    strategy = conf.get("sharding_strategy", "FULL_SHARD")
    if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
        raise ValueError(f"fsdp sharding_strategy must be FULL_SHARD, SHARD_GRAD_OP or NO_SHARD, got {strategy!r}")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[conf.get("mixed_precision")]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world = dist.get_world_size() if dist.is_initialized() else 1
    # NO_SHARD: replicate over all ranks, shards of one (FSDP2's HSDP)
    mesh = (init_device_mesh("cuda" if cuda else "cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
            if strategy == "NO_SHARD" else init_device_mesh("cuda" if cuda else "cpu", (world,)))
    kw = dict(mesh=mesh, reshard_after_forward=strategy == "FULL_SHARD",
              mp_policy=MixedPrecisionPolicy(param_dtype=half, reduce_dtype=half) if half and cuda
              else MixedPrecisionPolicy())
    for m in objective.modules():
        if isinstance(m, (glm.GLMBlock, glm2.GLMBlock)):
            fully_shard(m, **kw)
    return fully_shard(objective, **kw)


def gathered(objective, engine, fn):
    """fn() with ZeRO-3's or FSDP's sharded parameters gathered (the full float32 weights, on every rank), or
    plainly. Under FSDP each sharded parameter is swapped for its full tensor meanwhile, then put back."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    if isinstance(objective, FSDPModule):
        swapped = []
        with torch.no_grad():
            for m in objective.modules():
                for name, p in list(m._parameters.items()):
                    if isinstance(p, DTensor):  # collective: every rank walks the same modules in the same order
                        m._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                        swapped.append((m, name, p))
        try:
            return fn()
        finally:
            for m, name, p in swapped:
                m._parameters[name] = p
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(objective.parameters()), modifier_rank=None):
            return fn()
    return fn()


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(folder: Path, step, objective, opt, sched, identity, save, rank, engine=None):
    """trainer.pt (step, the trainable parameters, optimizer, schedule, RNG, identity) and the method's artifacts."""
    if engine is not None:
        engine.save_checkpoint(str(folder), tag="engine", client_state={"step": step, "identity": identity})
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if engine is None:
            torch.save({"step": step, "identity": identity,
                        "params": {n: p.detach().clone() for n, p in trainable(objective)},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "py_rng": random.getstate()}, folder / "trainer.pt")
    gathered(objective, engine, lambda: save(folder) if rank == 0 else None)
    if dist.is_initialized():
        dist.barrier()


def find_checkpoint(out: Path, resume) -> Path:
    if resume is True or resume == "latest":
        found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not found:
            raise ResumeError(f"--resume: no checkpoint-N folder under {out}")
        return found[-1]
    return Path(resume)


def load_checkpoint(folder: Path, objective, opt, sched, identity, engine=None) -> int:
    if engine is not None:
        _, client = engine.load_checkpoint(str(folder), tag="engine")
        if client is None:
            raise ResumeError(f"{folder}: no DeepSpeed checkpoint")
        check_identity(folder, client["identity"], identity)
        return client["step"]
    path = folder / "trainer.pt"
    if not path.exists():
        raise ResumeError(f"{folder}: not a training checkpoint (no trainer.pt)")
    try:  # weights_only: tensors, numbers, strings and containers; a pickled object that would run code is refused
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ResumeError(f"{path}: refused, it holds more than tensors and plain values; nothing in it was run "
                          f"({str(e).splitlines()[-1][:200]})") from None
    check_identity(folder, state["identity"], identity)
    params = dict(trainable(objective))
    if set(params) != set(state["params"]):
        raise ResumeError(f"{folder}: its trainable parameters differ from this run's")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state["params"][n].shape:
                raise ResumeError(f"{folder}: {n} has shape {tuple(state['params'][n].shape)}, "
                                  f"this run's is {tuple(p.shape)}")
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    random.setstate(state["py_rng"])
    return state["step"]


def check_identity(folder, saved: dict, now: dict):
    for key in now:
        if saved.get(key) != now[key]:
            raise ResumeError(f"{folder} is a checkpoint of another {key}: {saved.get(key)!r}, this run trains "
                              f"{now[key]!r}")


# ---------------------------------------------------------------- curves

def plot_curves(metrics: Path, png: Path, keys: list[str] | None = None):
    """One panel per logged number (loss; reward and KL for PPO; ...) against the step."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    skip = {"step", "lr", "tokens_per_s"}
    keys = keys or [k for k in rows[-1] if k not in skip]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
