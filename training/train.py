"""`dapo train`: learn DAPO's prompts and adapters on a labelled data set (CLIP stays frozen).

Defaults follow METHOD.md: Adam lr 1e-3, betas (0.5, 0.999), batch 8, 5 epochs, seed 42.
A checkpoint is written after every epoch (`epoch_<k>/` and `last/`), together with the
optimiser state, so `--resume` continues exactly where a run stopped.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.backbone import BackboneSpec
from training.checkpoint import load_learned, read_config, save_checkpoint
from training.data import AnomalyDataset, Sample, Vocabulary
from training.losses import dapo_loss
from training.model import DapoConfig, DapoModel, upsample_probs

OPTIMIZER = "optimizer.safetensors"


@dataclass
class TrainConfig:
    out: str = "runs/dapo"
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    image_weight: float = 1.0
    pixel_weight: float = 4.0
    focal_gamma: float = 2.0
    seed: int = 42
    device: str = "auto"
    amp: bool = False  # bf16 autocast on CUDA
    workers: int = 0
    max_steps: int | None = None  # stop early (benchmarks, smoke runs)
    model: DapoConfig = field(default_factory=DapoConfig)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    """Adam's moments as safetensors (no pickle); step counts go to JSON."""
    tensors, steps = {}, {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            if k == "step":
                steps[str(i)] = float(v)
            else:
                tensors[f"{i}.{k}"] = v.detach().contiguous().cpu()
    save_file(tensors, str(folder / OPTIMIZER))
    (folder / "optimizer_steps.json").write_text(json.dumps(steps))


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / OPTIMIZER))
    steps = json.loads((folder / "optimizer_steps.json").read_text())
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    for i, s in steps.items():
        state.setdefault(int(i), {})["step"] = torch.tensor(s)
    sd["state"] = state
    opt.load_state_dict(sd)


def step_loss(model: DapoModel, batch, words: list[str], cfg: TrainConfig, device: torch.device) -> dict:
    pixels, class_mask, labels, has_mask = (t.to(device) for t in batch)
    text = model.text_features(words)
    out = model(pixels, text)
    probs = upsample_probs(out["patch_probs"], class_mask.shape[-1])
    return dapo_loss(out["image_logits"], labels, probs, class_mask, has_mask, cfg.image_weight,
                     cfg.pixel_weight, cfg.focal_gamma)


def train(samples: list[Sample], vocab: Vocabulary, cfg: TrainConfig, resume: bool = False,
          progress: bool = True) -> Path:
    """Train and return the folder of the last checkpoint."""
    if not samples:
        raise ValueError("no training samples")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    start_epoch = 0
    model = DapoModel(cfg.model).to(device)
    words = list(vocab.words)
    opt = torch.optim.Adam(list(model.learned_parameters().values()), lr=cfg.lr, betas=cfg.betas)
    last = out / "last"
    if resume and (last / "config.json").is_file():
        meta = read_config(last)
        if meta["vocabulary"] != words:
            raise ValueError(f"{last}: trained on vocabulary {meta['vocabulary']}, this run has {words}")
        load_learned(model, load_file(str(last / "learned.safetensors")), source=str(last))
        _load_optimizer(opt, last)
        start_epoch = int(meta["epoch"])
    mean, std = model.normalisation
    dataset = AnomalyDataset(samples, size=model.geometry["image_size"], mean=mean, std=std)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                        num_workers=cfg.workers, drop_last=False)
    amp = cfg.amp and device.type == "cuda"
    steps = 0
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed + epoch)  # resumable: epoch k shuffles the same way every time
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        t0 = time.perf_counter()
        for batch in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                terms = step_loss(model, batch, words, cfg, device)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            values = {k: float(v.detach()) for k, v in terms.items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss became {values['loss']} at epoch {epoch + 1}")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        n = max(1, len(bar) if not cfg.max_steps else min(len(loader), steps))
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, **{k: v / n for k, v in sums.items()}}
        history.append(record)
        if progress:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
        meta = {"epoch": epoch + 1, "train": asdict(cfg) | {"model": None}, "history": history}
        for folder in (out / f"epoch_{epoch + 1}", last):
            save_checkpoint(model, folder, vocabulary=words, **meta)
            _save_optimizer(opt, folder)
        if cfg.max_steps and steps >= cfg.max_steps:
            break
    return last


def config_from_args(args) -> TrainConfig:
    spec = BackboneSpec(name=args.backbone, pretrained=args.pretrained or None, image_size=args.image_size,
                        seed=args.seed)
    taps = [int(t) for t in args.taps.split(",")] if args.taps else None
    model = DapoConfig(backbone=spec, taps=taps, seed=args.seed, text_mode=args.text_mode)
    return TrainConfig(out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       device=args.device, amp=args.amp, workers=args.workers, max_steps=args.max_steps, model=model)
