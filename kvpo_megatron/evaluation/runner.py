"""Evaluation: every model variant generates every held-out prompt; each video is decoded, written and scored.

Variants (columns of the report): the base model (adapters off), then per checkpoint argument

* a training checkpoint ``iter_NNNNNNN``: its raw LoRA and/or its EMA (``eval.weights``);
* a directory of training checkpoints (a ``checkpoint.dir``): every complete checkpoint in it, oldest first;
* a peft adapter directory (``final_adapter/``, ``final_adapter_ema/``, or an export).

Jobs (rows): one per (setting, prompt). Generation goes through ``StreamingGenerator.generate`` with the same
noise for every variant of a job. Each finished video leaves ``videos/<setting>/pNNN__<variant>.mp4`` (+ a
poster ``.png``) and, last, ``scores/<setting>/pNNN__<variant>.json``: a job whose JSON exists is skipped, so
an interrupted evaluation resumes where it stopped. Under torchrun, jobs are spread over the data-parallel
ranks (prompt ``i`` -> DP rank ``i % DP``); the ranks of one model-parallel group run the same jobs and its
first rank writes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kvpo_megatron.accelerate import accelerate
from kvpo_megatron.checkpoint import training_adapter as ta
from kvpo_megatron.checkpoint.dist import tensor_metadata
from kvpo_megatron.checkpoint.loading import load_weights_with_lora, warn_if_random_weights
from kvpo_megatron.checkpoint.training import EMA_PREFIX, complete_checkpoints
from kvpo_megatron.conditioning.text_encoder import build_text_encoder
from kvpo_megatron.conditioning.vae import build_decoder
from kvpo_megatron.conditioning.video_io import write_mp4
from kvpo_megatron.data.prompts import PromptDataset
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.evaluation.config import EvalConfig, WeightsChoice
from kvpo_megatron.lora import adapters_disabled, load_adapter
from kvpo_megatron.model.build import build_model
from kvpo_megatron.model.multishot import is_scene_cut
from kvpo_megatron.parallel.state import init_parallel, validate_tokens
from kvpo_megatron.rewards.composite import build_reward, spans_from_switch_frames
from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, StreamingGenerator
from kvpo_megatron.sampling.noise import StepNoise

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Variant:
    label: str
    """Column name in the report (unique)."""
    kind: str
    """``base`` | ``training`` | ``adapter``."""
    path: str | None = None
    weights: str | None = None
    """Training checkpoints: ``raw`` or ``ema``."""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label)


@dataclass(kw_only=True, slots=True)
class Job:
    setting: str
    index: int
    prompts: list[str]
    switch_frames: list[int]
    num_frames: int

    def stem(self, variant: Variant) -> str:
        return f"p{self.index:03d}__{variant.slug}"


def _has_ema(path: Path) -> bool:
    return any(k.startswith(EMA_PREFIX) for k in tensor_metadata(path))


def plan_variants(paths: list[str], cfg: EvalConfig) -> list[Variant]:
    """The report's columns, in order; labels are made unique with parent directory names."""
    out = [Variant(label="base", kind="base")] if cfg.base else []
    found: list[tuple[Path, str, str | None]] = []
    for raw in paths:
        p = Path(raw)
        if ta.is_training_checkpoint(p):
            ckpts = [p]
        elif p.is_dir() and (p / "adapter_config.json").is_file():
            found.append((p, "adapter", None))
            continue
        elif p.is_dir() and complete_checkpoints(p):
            ckpts = complete_checkpoints(p)
        else:
            raise ConfigError(f"{p}: neither a training checkpoint (iter_NNNNNNN with complete.json), a directory "
                              "of them, nor a peft adapter directory (adapter_config.json)")
        for c in ckpts:
            ema = _has_ema(c)
            if cfg.weights == WeightsChoice.ema and not ema:
                raise ConfigError(f"eval.weights=ema: {c} holds no EMA weights (trained with ema.decay=0)")
            if cfg.weights in (WeightsChoice.raw, WeightsChoice.both):
                found.append((c, "training", "raw"))
            if cfg.weights in (WeightsChoice.ema, WeightsChoice.both) and ema:
                found.append((c, "training", "ema"))
    if not found and not out:
        raise ConfigError("nothing to evaluate: no checkpoints given and eval.base=false")

    def label(p: Path, weights: str | None, depth: int) -> str:
        name = "/".join(p.parts[-depth:])
        return f"{name}-ema" if weights == "ema" else name

    depth = 1
    while True:
        labels = [label(p, w, depth) for p, _, w in found]
        if len(set(labels)) == len(labels) and "base" not in labels or depth > 8:
            break
        depth += 1
    if len(set(labels)) != len(labels):
        raise ConfigError(f"checkpoints given twice: {sorted(set(x for x in labels if labels.count(x) > 1))}")
    out += [Variant(label=lb, kind=k, path=str(p), weights=w) for lb, (p, k, w) in zip(labels, found)]
    return out


def plan_jobs(cfg: EvalConfig, *, train_frames: int, frames_per_block: int) -> list[Job]:
    """Every (setting, prompt) of the evaluation, with frames and switches checked against the block size."""
    jobs = []
    for name, s in cfg.settings().items():
        nf = s.num_frames or train_frames * s.length_factor
        if nf % frames_per_block:
            raise ConfigError(f"eval.{name}.num_frames={nf} must be a multiple of cache.frames_per_block "
                              f"({frames_per_block})")
        ds = PromptDataset(s.prompts, num_frames=nf, num_segments=s.num_segments, switch_interval=s.switch_interval)
        for i in range(min(len(ds), s.max_prompts or len(ds))):
            sample = ds[i]
            switches = list(sample.switch_frames)
            if ds.records[i].switch_frames is None and s.switch_interval is None:  # equal split: align to blocks
                switches = [sw - sw % frames_per_block for sw in switches]
            bad = [sw for sw in switches if sw % frames_per_block or sw <= 0]
            if bad or len(set(switches)) != len(switches):
                raise ConfigError(f"eval.{name}: prompt {i} of {s.prompts} switches at latent frames "
                                  f"{sample.switch_frames}; switches must be distinct multiples of "
                                  f"cache.frames_per_block ({frames_per_block}) after 0")
            jobs.append(Job(setting=name, index=i, prompts=list(sample.prompts), switch_frames=switches,
                            num_frames=nf))
    return jobs


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class Evaluator:
    """Builds the model once (as the trainer does) and runs the jobs of this rank for every variant."""

    def __init__(self, train_cfg, eval_cfg: EvalConfig, out: str | Path, *, fingerprint: str = ""):
        """``fingerprint``: identifies the model/sampler/reward configuration; a finished job of another one is
        generated again rather than reused."""
        self.cfg, self.ecfg, self.out, self.fingerprint = train_cfg, eval_cfg, Path(out), fingerprint
        par = train_cfg.parallel
        self.pgs = init_parallel(par)
        self.dp_rank, self.dp_size = dist.get_rank(self.pgs.dp), dist.get_world_size(self.pgs.dp)
        self.writer = dist.get_rank(self.pgs.tp_cp) == 0  # first rank of this model-parallel group writes
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(train_cfg.train.seed)  # as the trainer: a random-init base model is the same model
        self.model = build_model(train_cfg.model, pg_collection=self.pgs, tp=par.tensor_model_parallel_size,
                                 cp=par.context_parallel_size, cp_attention=par.cp_attention)
        validate_tokens(self.model.config, par, train_cfg.video.latent_height, train_cfg.video.latent_width)
        warn_if_random_weights(train_cfg.model)
        load_weights_with_lora(self.model, train_cfg.model, train_cfg.lora)
        if train_cfg.model.checkpoint is None:
            log.warning("model.checkpoint is not set: the base model is the random init of train.seed=%d "
                        "(the same as the training run's at the same parallel layout)", train_cfg.train.seed)
        self.model.to(self.device).eval()
        runner = accelerate(self.model, train_cfg.model, device=self.device)
        mc = self.model.config
        self.text_encoder = build_text_encoder(dataclasses.replace(train_cfg.text, text_len=mc.text_len,
                                                                   text_dim=mc.text_dim))
        self.decoder = build_decoder(train_cfg.decoder)
        self.reward = build_reward(train_cfg.reward)
        self.gen = StreamingGenerator(self.model, FlowMatchSampler(train_cfg.sampler), train_cfg.cache,
                                      recache_on_switch=train_cfg.recache_on_switch, runner=runner)

    # ---- paths ----------------------------------------------------------------------------------------------
    def video_path(self, job: Job, v: Variant) -> Path:
        return self.out / "videos" / job.setting / f"{job.stem(v)}.mp4"

    def score_path(self, job: Job, v: Variant) -> Path:
        return self.out / "scores" / job.setting / f"{job.stem(v)}.json"

    def _record_key(self, job: Job, v: Variant) -> dict:
        return {"prompts": job.prompts, "switch_frames": job.switch_frames, "num_frames": job.num_frames,
                "seed": self.ecfg.seed, "path": v.path, "weights": v.weights, "fingerprint": self.fingerprint}

    def done(self, job: Job, v: Variant) -> bool:
        """The job's video and scores exist and were made with the same prompts, noise, weights and model."""
        score = self.score_path(job, v)
        if not (score.is_file() and self.video_path(job, v).is_file()):
            return False
        try:
            rec = json.loads(score.read_text())
        except json.JSONDecodeError:
            return False
        same = all(rec.get(k) == want for k, want in self._record_key(job, v).items())
        if not same:
            log.warning("%s was made with other settings: generating it again", score)
        return same

    # ---- weights --------------------------------------------------------------------------------------------
    @contextmanager
    def weights(self, v: Variant):
        """The model holds variant ``v``'s weights inside the block."""
        if v.kind == "base":
            with adapters_disabled(self.model):
                yield
            return
        if v.kind == "training":
            ta.load_training_adapter(self.model, v.path, v.weights)
        else:
            load_adapter(self.model, v.path)
        yield

    # ---- one video ------------------------------------------------------------------------------------------
    def _key(self, job: Job) -> list[int]:
        return [self.ecfg.seed, 0 if job.setting == "short" else 1, job.index]

    def noise(self, job: Job) -> torch.Tensor:
        mc, v = self.model.config, self.cfg.video
        key = np.random.SeedSequence(self._key(job)).generate_state(1)
        g = torch.Generator().manual_seed(int(key[0]))
        return torch.randn(1, mc.in_channels, job.num_frames, v.latent_height, v.latent_width, generator=g)

    @torch.no_grad()
    def generate(self, job: Job) -> torch.Tensor:
        """Decoded frames [1, T, 3, H, W] of ``job`` under the model's current weights. Every variant gets the
        same initial noise and (re-noising sampler) the same keyed step noise."""
        emb, _ = self.text_encoder.encode(job.prompts)
        starts = [0, *job.switch_frames]
        switches = [PromptSwitch(s, self.model.encode_text(emb[i:i + 1].to(self.device)), s > 0 and is_scene_cut(p))
                    for i, (s, p) in enumerate(zip(starts, job.prompts))]
        latents = self.gen.generate(self.noise(job).to(self.device), switches, step_noise=StepNoise(*self._key(job)))
        return self.decoder.decode(latents.float().cpu()).cpu()

    def score(self, job: Job, frames: torch.Tensor) -> list[dict]:
        """Every reward component (and the weighted total) on each prompt segment of the video."""
        spans = spans_from_switch_frames(job.switch_frames, num_latent_frames=job.num_frames,
                                         num_frames=frames.shape[1])
        bounds = [0, *job.switch_frames, job.num_frames]
        rows = []
        for i, ((s, e), prompt) in enumerate(zip(spans, job.prompts)):
            out = self.reward(frames[:, s:e], [prompt])
            rows.append({"segment": i, "prompt": prompt, "latent_start": bounds[i], "latent_end": bounds[i + 1],
                         "frame_start": s, "frame_end": e,
                         "components": {k: float(v[0]) for k, v in out.components.items()},
                         "total": float(out.total[0])})
        return rows

    def run_job(self, job: Job, v: Variant) -> None:
        frames = self.generate(job)
        segments = self.score(job, frames)
        if not self.writer:
            return
        video, score = self.video_path(job, v), self.score_path(job, v)
        video.parent.mkdir(parents=True, exist_ok=True)
        score.parent.mkdir(parents=True, exist_ok=True)
        tmp = video.with_name(f".{video.stem}.tmp-{os.getpid()}.mp4")  # PyAV picks the container by suffix
        write_mp4(frames[0], tmp, fps=self.ecfg.fps)
        os.replace(tmp, video)
        save_poster(frames[0], video.with_suffix(".png"))
        record = {"setting": job.setting, "prompt_index": job.index, "variant": v.label, "kind": v.kind,
                  **self._record_key(job, v),
                  "video": video.relative_to(self.out).as_posix(),
                  "poster": video.with_suffix(".png").relative_to(self.out).as_posix(),
                  "segments": segments}
        _atomic_write(score, lambda p: p.write_text(json.dumps(record, indent=1)))

    # ---- all ------------------------------------------------------------------------------------------------
    def run(self, variants: list[Variant], jobs: list[Job]) -> int:
        """Run this rank's unfinished jobs of every variant; returns how many videos this rank generated."""
        mine = [j for i, j in enumerate(jobs) if i % self.dp_size == self.dp_rank]
        todo = {v.label: [j for j in mine if not self.done(j, v)] for v in variants}
        dist.barrier()  # every rank has looked at the finished files before anyone writes new ones
        total = sum(len(t) for t in todo.values())
        skipped = len(mine) * len(variants) - total
        if skipped:
            log.info("resuming: %d of this rank's %d videos are already done", skipped, len(mine) * len(variants))
        bar = tqdm(total=total, disable=not (self.ecfg.progress and dist.get_rank() == 0), desc="evaluate",
                   unit="video")
        made = 0
        for v in variants:
            need = torch.tensor([float(bool(todo[v.label]))], device=self.device)
            dist.all_reduce(need)  # loading a training checkpoint is collective: all ranks load or none
            if need.item() == 0:
                continue
            with self.weights(v):
                for j in todo[v.label]:
                    bar.set_postfix_str(f"{v.label} {j.setting} p{j.index}")
                    self.run_job(j, v)
                    made += 1
                    bar.update(1)
        bar.close()
        dist.barrier()
        return made


def save_poster(frames: torch.Tensor, path: Path, *, min_height: int = 96) -> Path:
    """The middle frame of ``frames`` [T, 3, H, W] as a PNG (enlarged, nearest, to at least ``min_height``)."""
    from PIL import Image

    f = frames[frames.shape[0] // 2].float().clamp(0, 1)
    scale = max(1, -(-min_height // f.shape[-2]))
    f = f.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    img = (f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    _atomic_write(path, lambda p: Image.fromarray(img).save(p, format="PNG"))
    return path
