"""KVPO training loop: rollout -> reward -> advantages -> TVE coefficients -> replay gradients -> update.

One iteration, per data-parallel rank (each rank owns its prompt groups; model-parallel ranks of a group
route identically because routes are a pure function of (seed, iteration, prompt, branch)); steps 1-4 run per
prompt group, in one schedule (``_groups``):

  1. rollout: prefix once, anchor, G routed branches; replay tuples + no-grad TVE_old / TVE_ref scores;
  2. reward: decode anchor + branches, composite reward per component (per prompt segment; ``score_group``);
  3. objective: per-component advantages, guard, c_k = dLoss/dTVE_k;
  4. replay: gradients of sum_k c_k TVE_k, one tuple's activations at a time;
  5. update: DP gradient reduction, non-finite check, grad-norm clip, AdamW step, LR schedule.

With ``train.overlap`` the rollout of group j+1 overlaps steps 2-4 of group j (``kvpo/pipeline.py``; exact).
With ``parallel.branches_over_dp`` DP rank 0 alone rolls out the anchor, and ``kvpo/branch_schedule.py`` decides
which rank replays which branch (some before the coefficients, some handed over; exact).
Checkpoints and resume: ``kvpo/run_state.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kvpo_megatron.accelerate import accelerate, fp8_enabled
from kvpo_megatron.checkpoint import training as ckpt
from kvpo_megatron.checkpoint.loading import load_weights_with_lora, warn_if_random_weights
from kvpo_megatron.conditioning.text_encoder import build_text_encoder
from kvpo_megatron.conditioning.vae import build_decoder
from kvpo_megatron.config import to_dict
from kvpo_megatron.data.prompts import PromptDataset, PromptLoader, PromptSample
from kvpo_megatron.data.rollout_archive import RolloutArchive
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.extras import check_job_extras
from kvpo_megatron.kvpo import branch_schedule as schedule
from kvpo_megatron.kvpo import routing as chr
from kvpo_megatron.kvpo import run_state
from kvpo_megatron.kvpo.ema import ParameterEMA
from kvpo_megatron.kvpo.metrics import MetricsLogger, dp_mean, iteration_line
from kvpo_megatron.kvpo.objective import gibbs_log_policy, guard_passes, multi_advantages, tve_coefficients
from kvpo_megatron.kvpo.pipeline import ModelGuard, Timeline, check_overlap_supported, replay_generator, run_overlapped
from kvpo_megatron.kvpo.replay import plan_replay, replay_gradients
from kvpo_megatron.kvpo.rollout import Rollout
from kvpo_megatron.kvpo.samples import SampleLogger
from kvpo_megatron.kvpo.train_config import KVPOTrainConfig
from kvpo_megatron.kvpo.types import GroupResult, PromptContext, RolloutGroup
from kvpo_megatron.lora import adapters_disabled, lora_parameters, merged, save_adapter, unmerged
from kvpo_megatron.model.build import build_model
from kvpo_megatron.model.multishot import is_scene_cut
from kvpo_megatron.parallel.data_parallel import clip_grad_norm, wrap_data_parallel
from kvpo_megatron.parallel.state import init_parallel, validate_tokens
from kvpo_megatron.rewards.composite import build_reward, spans_from_switch_frames
from kvpo_megatron.sampling import FlowMatchSampler, StreamingGenerator

log = logging.getLogger(__name__)


@contextmanager
def _timer(times: dict, key: str):
    """Wall time of the block (device-synchronised on a GPU) into ``times[key]``; on a GPU also the peak device
    memory allocated during it, in GB, into ``times["mem_" + phase + "_peak_gb"]`` (max over calls)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
        mem = "mem_" + key.removeprefix("time_") + "_peak_gb"
        times[mem] = max(times.get(mem, 0.0), torch.cuda.max_memory_allocated() / 1e9)
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0


class KVPOTrainer:
    def __init__(self, cfg: KVPOTrainConfig):
        check_job_extras(cfg)  # a feature whose setup.py extra is missing stops here, naming the extra
        self.cfg = cfg
        par = cfg.parallel
        self.pgs = init_parallel(par)
        self.rank = dist.get_rank()
        self.dp_rank, self.dp_size = dist.get_rank(self.pgs.dp), dist.get_world_size(self.pgs.dp)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, pg_collection=self.pgs, tp=par.tensor_model_parallel_size,
                                 cp=par.context_parallel_size, cp_attention=par.cp_attention)
        validate_tokens(self.model.config, par, cfg.video.latent_height, cfg.video.latent_width)
        warn_if_random_weights(cfg.model)
        load_weights_with_lora(self.model, cfg.model, cfg.lora)  # a converted checkpoint's LoRA trains on
        self.model.to(self.device)
        self.runner = accelerate(self.model, cfg.model, device=self.device)
        self.ddp = wrap_data_parallel(self.model, self.pgs)
        self.params = [p for _, p in lora_parameters(self.model)]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                           eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / max(1, o.warmup_steps)))
        self.ema = ParameterEMA(lora_parameters(self.model), cfg.ema.decay) if cfg.ema.enabled else None
        mc = self.model.config
        text_cfg = dataclasses.replace(cfg.text, text_len=mc.text_len, text_dim=mc.text_dim)
        self.text_encoder = build_text_encoder(text_cfg)
        self.decoder = build_decoder(cfg.decoder)
        self.reward = build_reward(cfg.reward)
        self.weights = {c.name: c.weight for c in cfg.reward.components}
        self.branch_ids, self.anchor_here = None, True
        if par.branches_over_dp:
            g = cfg.rollout.num_branches
            if g % self.dp_size:
                raise ConfigError(f"parallel.branches_over_dp needs rollout.num_branches ({g}) divisible by the "
                                  f"data-parallel size ({self.dp_size})")
            per = g // self.dp_size
            self.branch_ids = list(range(self.dp_rank * per, (self.dp_rank + 1) * per))
            self.anchor_here = self.dp_rank == schedule.ANCHOR_RANK
        dataset = PromptDataset(cfg.data.prompts, num_frames=cfg.video.num_frames,
                                num_segments=cfg.data.num_segments, switch_interval=cfg.data.switch_interval)
        # with branches over DP, every DP rank works on the same prompts (and a slice of their branches)
        shard = (0, 1) if par.branches_over_dp else (self.dp_rank, self.dp_size)
        self.loader = PromptLoader(dataset, dp_rank=shard[0], dp_size=shard[1], seed=cfg.train.seed,
                                   prompts_per_rank=cfg.data.prompts_per_rank)
        self.gen = StreamingGenerator(self.model, FlowMatchSampler(cfg.sampler), cfg.cache,
                                      recache_on_switch=cfg.recache_on_switch, runner=self.runner)
        self.rollout = Rollout(self.gen, cfg.routing, cfg.rollout, seed=cfg.train.seed, reference=self._reference,
                               scoring=self._training_form, generation=self._generation_form)
        self.replay_plan = plan_replay(cfg.replay, self.model.config, cfg.video, self.device)
        self.replay_gen = self.gen
        if cfg.train.overlap:  # the pipeline's worker replays on its own generator; pi_ref under a lock
            check_overlap_supported(tp=par.tensor_model_parallel_size, cp=par.context_parallel_size,
                                    te_spec=self.model.config.spec == "te", merge_lora=cfg.rollout.merge_lora,
                                    cuda_graphs=cfg.model.cuda_graphs)
            guard = ModelGuard(self.model, adapters_disabled)
            self.rollout.reference = guard.reference
            self.replay_gen = replay_generator(self.gen, guard)
        self.last_timeline: Timeline | None = None
        self.metrics = MetricsLogger(cfg.train.out_dir, enabled=self.rank == 0)
        self.iteration = 0
        self.consecutive_skips = 0
        resume_from = ckpt.select_checkpoint(cfg.checkpoint)  # verified on rank 0 before any rank loads
        if resume_from is None:
            run_state.prepare_fresh_out_dir(cfg, self.rank)
        else:
            self._resume(resume_from)
        self.metrics.open(self.iteration)  # one history: rows and events after the resumed iteration are dropped
        self.samples = SampleLogger(cfg.logging, out_dir=cfg.train.out_dir, enabled=self.rank == 0,
                                    decoder=self.decoder, tau=cfg.objective.tau, tensorboard=self.metrics.writer,
                                    run_config=to_dict(cfg))
        self.archive = None
        if cfg.train.rollout_archive and self.rank == 0:
            self.archive = RolloutArchive(cfg.train.rollout_archive)

    # ---- execution forms of the one model -----------------------------------------------------
    @contextmanager
    def _generation_form(self):
        """No-grad generation: merged adapters (``rollout.merge_lora``) and FP8 where the spec built it."""
        with contextlib.ExitStack() as st:
            if self.cfg.rollout.merge_lora:
                st.enter_context(merged(self.model))
            st.enter_context(fp8_enabled(self.model, True))
            yield

    @contextmanager
    def _training_form(self):
        """pi_theta as the replay differentiates it: unmerged adapters, FP8 only with ``model.fp8_replay``."""
        with unmerged(self.model), fp8_enabled(self.model, self.cfg.model.fp8_replay):
            yield

    @contextmanager
    def _reference(self):
        """pi_ref: adapters disabled, in the training form's precision."""
        with fp8_enabled(self.model, self.cfg.model.fp8_replay), adapters_disabled(self.model):
            yield

    # ---- checkpoints (kvpo/run_state.py) -----------------------------------------------------------
    def _resume(self, path: Path):
        self.iteration, loop = run_state.resume(path, self.cfg, model=self.model, optimizer=self.optimizer,
                                                scheduler=self.scheduler, loader=self.loader, pg_collection=self.pgs,
                                                ema=self.ema)
        self.consecutive_skips, self.metrics.history = loop.consecutive_skips, loop.history

    def _save(self):
        loop = run_state.LoopState(consecutive_skips=self.consecutive_skips, history=self.metrics.history,
                                   config=to_dict(self.cfg))
        run_state.save(self.cfg, self.iteration, loop, model=self.model, optimizer=self.optimizer,
                       scheduler=self.scheduler, loader=self.loader, pg_collection=self.pgs, ema=self.ema)

    # ---- one prompt group --------------------------------------------------------------------
    def _contexts(self, sample: PromptSample) -> list[PromptContext]:
        emb, _ = self.text_encoder.encode(sample.prompts)
        starts = [0, *sample.switch_frames]
        return [PromptContext(start_frame=s, context=emb[i:i + 1].to(self.device),
                              shot_boundary=i > 0 and is_scene_cut(sample.prompts[i])) for i, s in enumerate(starts)]

    def score_group(self, group: RolloutGroup, sample: PromptSample) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The reward hook (no grad): (component -> [G] branch rewards, component -> the anchor's, or None where the
        group has no anchor). A subclass may override it (``benchmarks/equivalence.py`` adds per-branch offsets)."""
        first = [] if group.anchor is None else [group.anchor]
        videos = torch.cat([b.latents for b in first + group.branches])
        frames = self.decoder.decode(videos.float())
        spans = spans_from_switch_frames(sample.switch_frames, num_latent_frames=videos.shape[2],
                                         num_frames=frames.shape[1])
        out = self.reward(frames, [sample.prompts] * videos.shape[0], [spans] * videos.shape[0])
        comps = {k: v.float().cpu() for k, v in out.components.items()}
        if not first:
            return comps, None
        return {k: v[1:] for k, v in comps.items()}, {k: float(v[0]) for k, v in comps.items()}

    def _rollout_group(self, sample: PromptSample, prompt_index: int, slot: int) -> RolloutGroup:
        """Rollout of one prompt group; ``slot`` (its position in the iteration) keeps its KV pages apart from the
        other groups' (with ``train.overlap`` the next group's rollout runs while this one replays)."""
        shape = (1, self.model.config.in_channels, self.cfg.video.num_frames, self.cfg.video.latent_height,
                 self.cfg.video.latent_width)
        return self.rollout.run(self._contexts(sample), shape, iteration=self.iteration,
                                prompt_index=prompt_index, branch_ids=self.branch_ids, device=self.device,
                                slot=slot, anchor=self.anchor_here)

    def _coefficients(self, group: RolloutGroup, rewards: dict[str, torch.Tensor],
                      anchor: dict[str, float] | None) -> GroupResult:
        """Advantages, guard and c_k = dLoss/dTVE_k of one scored group."""
        tve_old = torch.tensor([b.tve_old for b in group.branches])
        tve_ref = torch.tensor([b.tve_ref for b in group.branches])
        if self.branch_ids is not None:  # the group's rewards and energies live on all DP ranks
            rewards = {k: self._gather_dp(v) for k, v in rewards.items()}
            tve_old, tve_ref = self._gather_dp(tve_old), self._gather_dp(tve_ref)
            anchor = self._anchor_from(schedule.ANCHOR_RANK, anchor, sorted(rewards))
        total = sum(self.weights[k] * v for k, v in rewards.items())
        anchor_total = sum(self.weights[k] * v for k, v in anchor.items())
        adv = multi_advantages(rewards, anchor, self.weights, baseline=self.cfg.objective.baseline,
                               clip=self.cfg.objective.adv_clip)
        coeffs, terms = tve_coefficients(tve_old, tve_old, tve_ref, adv, self.cfg.objective)
        passed = guard_passes(total, anchor_total) or not self.cfg.objective.guard
        coeffs = coeffs if passed else torch.zeros_like(coeffs)
        return GroupResult(group=group, rewards=rewards, anchor=anchor, total=total, anchor_total=anchor_total,
                           adv=adv, coeffs=coeffs if self.branch_ids is None else coeffs[self.branch_ids],
                           all_coeffs=coeffs, terms=terms, tve=tve_old, passed_guard=passed)

    def _gather_dp(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-length per-rank vectors over the DP group (in rank order)."""
        x = x.to(self.device)  # NCCL collectives need device tensors
        parts = [torch.empty_like(x) for _ in range(self.dp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.pgs.dp)
        return torch.cat(parts).cpu()

    def _anchor_from(self, dp_rank: int, anchor: dict[str, float] | None, names: list[str]) -> dict[str, float]:
        """The anchor's reward components, as DP rank ``dp_rank`` (which rolled it out) scored them."""
        vals = torch.tensor([anchor[k] for k in names] if anchor is not None else [0.0] * len(names),
                            dtype=torch.float64, device=self.device)
        dist.broadcast(vals, src=dist.get_global_rank(self.pgs.dp, dp_rank), group=self.pgs.dp)
        return dict(zip(names, vals.tolist()))

    # ---- one iteration -----------------------------------------------------------------------
    def _replay_scale(self, num_groups: int) -> float:
        # DDP averages over the data(-and-context)-parallel ranks: prompts over DP want that mean; branches over
        # DP hold disjoint parts of one sum, so they scale the average back up by the DP size.
        return (self.dp_size if self.branch_ids is not None else 1.0) / num_groups

    def _groups(self, samples: list[PromptSample]) -> tuple[list[GroupResult], dict]:
        """The iteration's one schedule: zero the gradients, then per prompt group j: rollout -> reward ->
        coefficients -> replay (its gradients accumulate in group order). With ``train.overlap`` the rollout of
        group j+1 runs while group j is consumed (``kvpo/pipeline.py``; exact); else the groups run in turn."""
        self.optimizer.zero_grad(set_to_none=True)
        self.ddp.zero_grad_buffer()
        scale, overlap = self._replay_scale(len(samples)), self.cfg.train.overlap
        tl, times = Timeline(self.device), {}
        phase = tl.phase if overlap else lambda name, j: _timer(times, f"time_{name}")

        def produce(j: int) -> RolloutGroup:
            with phase("rollout", j):
                return self._rollout_group(samples[j], samples[j].index, j)

        def consume(j: int, group: RolloutGroup) -> GroupResult:
            tl_times = None if overlap else times
            with phase("reward", j), torch.no_grad():
                rewards, anchor = self.score_group(group, samples[j])
            plan, ahead = self._branch_plan(group), None
            if plan is not None and plan.ahead:  # branches over DP: replay ahead while DP rank 0 rolls out the anchor
                with phase("replay", j):
                    ahead = self._replay_ahead(group, plan.ahead, tl_times)
            with phase("coefficients", j):
                res = self._coefficients(group, rewards, anchor)
            if res.passed_guard:
                with phase("replay", j):
                    self._replay(res, scale, plan, ahead, tl_times=tl_times)
            elif ahead is not None:
                ahead[0].discard()
            return res

        if not overlap:
            return [consume(j, produce(j)) for j in range(len(samples))], times
        results = run_overlapped(len(samples), produce, consume, device=self.device, timeline=tl)
        self.last_timeline = tl
        return results, tl.metrics()

    def _replay_branches(self, group: RolloutGroup, branches: list, coeffs: torch.Tensor, scale: float,
                         tl_times: dict | None) -> list[float]:
        """Gradients of ``branches`` (BranchRollouts of ``group``'s prompt) weighted by ``coeffs``; their TVEs."""
        plan = self.replay_plan
        self.model.recompute_blocks = plan.recompute
        try:
            return replay_gradients(self.replay_gen, dataclasses.replace(group, branches=branches), coeffs,
                                    loss_scale=scale, batch_size=plan.batch_size,
                                    commit_pass=self.cfg.routing.commit_pass, generation=self._generation_form,
                                    training=self._training_form, times=tl_times)
        finally:
            self.model.recompute_blocks = False

    def _replay_ahead(self, group: RolloutGroup, ids: list[int],
                      tl_times: dict | None) -> tuple[schedule.GradStash, dict]:
        """Own branches ``ids``, each one's unweighted gradient captured apart (``branch_schedule``); returns
        (stash, branch -> TVE)."""
        stash, tve = schedule.GradStash([p.main_grad for p in self.params]), {}
        for br in (b for b in group.branches if b.branch in ids):
            tve[br.branch] = self._replay_branches(group, [br], torch.ones(1), 1.0, tl_times)[0]
            stash.capture(br.branch)
        return stash, tve

    def _branch_plan(self, group: RolloutGroup) -> schedule.ReplayAssignment | None:
        """Who replays which branch of ``group`` (branches over DP; None otherwise): config, or the balance."""
        if self.branch_ids is None:
            return None
        par, steps = self.cfg.parallel, self.gen.sampler.num_steps
        k, n = schedule.plan_counts(
            dp_size=self.dp_size, per_rank=len(self.branch_ids), steps=steps, window_blocks=len(group.window),
            suffix_blocks=self.cfg.video.num_frames // self.cfg.cache.frames_per_block - group.pivot,
            routed_steps=sum(chr.is_routed_step(self.cfg.routing, i, steps) for i in range(steps)),
            recompute=self.replay_plan.recompute)
        k = k if par.replay_ahead is None else min(par.replay_ahead, len(self.branch_ids))
        n = n if par.replay_handoff is None else min(par.replay_handoff, len(self.branch_ids))
        return schedule.assign(dp_rank=self.dp_rank, dp_size=self.dp_size, num_branches=self.cfg.rollout.num_branches,
                               n=n, k=k)

    def _replay(self, res: GroupResult, scale: float, plan: schedule.ReplayAssignment | None, ahead, *,
                tl_times: dict | None) -> None:
        """Gradient phase of one group: sets ``res.tve_replay`` ([G_all], the TVEs the replay recomputed) and
        ``res.replayed``. Branches over DP follow ``plan``: the branches replayed ahead are weighted now, then
        the remaining own ones and those DP rank 0 hands off are replayed."""
        group, c = res.group, res.all_coeffs
        tve = torch.zeros(len(c))
        todo = group.branches
        if plan is not None:
            received = schedule.exchange(group.branches, plan, dp_rank=self.dp_rank, group=self.pgs.dp,
                                         device=self.device)
            todo = [b for b in group.branches if b.branch in plan.own] + received
        if ahead is not None:
            stash, ahead_tve = ahead
            stash.combine({g: float(c[g]) * scale for g in ahead_tve})
            for g, v in ahead_tve.items():
                tve[g] = v
        ids = [b.branch for b in todo]
        for g, v in zip(ids, self._replay_branches(group, todo, c[ids], scale, tl_times) if todo else []):
            tve[g] = v
        res.tve_replay, res.replayed = tve, (sorted(ahead[1]) if ahead else []) + ids

    def _ratio_deviation(self, results: list[GroupResult]) -> float:
        """max_k |pi_theta(k) / pi_old(k) - 1| at the update's parameters: the replay's TVEs against the rollout's
        TVE_old (0 when both evaluate the same function; merged-LoRA generation and bf16 kernels make it small,
        not 0); 0 when no group was replayed."""
        devs = []
        for r in results:
            if r.tve_replay is None:
                continue
            full = r.tve_replay
            if self.branch_ids is not None:  # each branch was replayed on exactly one DP rank
                full = full.to(self.device)
                dist.all_reduce(full, group=self.pgs.dp)
                full = full.cpu()
            tau = self.cfg.objective.tau
            rho = (gibbs_log_policy(full.double(), tau) - gibbs_log_policy(r.tve.double(), tau)).exp()
            devs.append(float((rho - 1).abs().max()))
        return max(devs) if devs else 0.0

    def _work(self) -> tuple[float, int]:
        """(model FLOPs, block forwards of single samples) issued so far by this trainer's engines."""
        gens = {id(g): g for g in (self.gen, self.replay_gen)}.values()
        return sum(g.flops for g in gens), sum(g.sample_forwards for g in gens)

    def step(self) -> dict:
        flops0, forwards0 = self._work()
        results, times = self._groups(self.loader.next())
        any_update = torch.tensor([float(any(r.passed_guard for r in results))], device=self.device)
        dist.all_reduce(any_update, group=self.pgs.dp)
        with _timer(times, "time_update"):
            self.ddp.finish_grad_sync()
            for p in self.params:
                p.grad = p.main_grad.to(p.dtype)
            finite = torch.tensor([float(all(torch.isfinite(p.grad).all() for p in self.params) and all(
                torch.isfinite(r.total).all() and math.isfinite(r.anchor_total) and
                torch.isfinite(r.terms.total) for r in results))], device=self.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip, self.pgs.mp)
            stepped = bool(any_update.item() > 0 and finite.item() > 0)
            if stepped:
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
            self.scheduler.step()
        self.consecutive_skips = 0 if finite.item() > 0 else self.consecutive_skips + 1
        self.last_results, self.last_times = results, times  # for inspection (tests, benches: this rank's phases)
        flops1, forwards1 = self._work()
        times.update(tflop=(flops1 - flops0) / 1e12, block_forwards=float(forwards1 - forwards0))
        metrics = self._metrics(results, times, grad_norm, stepped, finite.item() > 0)
        if self.cfg.train.overlap and self.rank == 0:
            self.last_timeline.append_jsonl(Path(self.cfg.train.out_dir) / "timeline.jsonl", iteration=self.iteration)
        self._archive(results)
        return metrics

    def _metrics(self, results, times, grad_norm, stepped, finite) -> dict:
        tve = torch.cat([r.tve for r in results])
        local = {
            "reward_mean": float(torch.cat([r.total for r in results]).mean()),
            "anchor_reward": sum(r.anchor_total for r in results) / len(results),
            "adv_mean": float(torch.cat([r.adv for r in results]).mean()),
            "adv_std": float(torch.cat([r.adv for r in results]).std()),
            "tve_mean": float(tve.mean()), "tve_spread": float(tve.max() - tve.min()),
            "entropy": sum(r.terms.entropy for r in results) / len(results),
            "clip_frac": sum(r.terms.clip_frac for r in results) / len(results),
            "kl": sum(float(r.terms.kl.detach()) for r in results) / len(results),
            "skipped_by_guard": sum(not r.passed_guard for r in results) / len(results),
            "ratio_dev": self._ratio_deviation(results),
            **times,
        }
        for name in results[0].rewards:
            local[f"reward/{name}"] = float(torch.cat([r.rewards[name] for r in results]).mean())
        out = dp_mean(local, group=self.pgs.dp, device=self.device)  # ranks may differ in timing keys
        out.update(grad_norm=grad_norm, stepped=float(stepped), nonfinite_skip=float(not finite),
                   lr=self.scheduler.get_last_lr()[0])
        return out

    def _archive(self, results):
        if self.archive is None:
            return
        r = results[0]
        g = r.group
        self.archive.write(self.iteration, {
            "anchor_latents": g.anchor.latents.cpu(), "branch_latents": torch.cat([b.latents for b in g.branches]).cpu(),
            **{f"reward_{k}": v for k, v in r.rewards.items()}, "advantages": r.adv,
            "tve": r.tve, "pivot": g.pivot,
            "routes": torch.tensor([[g.branches[i].routes[b] for b in g.window] for i in range(len(g.branches))])})

    # ---- loop --------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        tc = self.cfg.train
        bar = tqdm(total=tc.iterations, initial=self.iteration, disable=not (tc.progress and self.rank == 0),
                   desc="kvpo")
        while self.iteration < tc.iterations:
            m = self.step()
            self.iteration += 1
            self.metrics.log(self.iteration, m)
            self.samples.after_iteration(self.iteration, m, self.last_results, self.loader.dataset)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.4f}", anchor=f"{m['anchor_reward']:.4f}",
                            H=f"{m['entropy']:.3f}", kl=f"{m['kl']:.2e}", gnorm=f"{m['grad_norm']:.2e}")
            log.info("%s", iteration_line(self.iteration, m, num_branches=self.cfg.rollout.num_branches))
            if m["nonfinite_skip"]:
                log.warning("iteration %d: non-finite reward/loss/gradient, update skipped (%d in a row)",
                            self.iteration, self.consecutive_skips)
                if self.consecutive_skips >= tc.max_consecutive_skips:
                    raise RuntimeError(f"{self.consecutive_skips} consecutive non-finite updates "
                                       f"(train.max_consecutive_skips={tc.max_consecutive_skips}); stopping")
            c = self.cfg.checkpoint
            if c.dir and c.every and self.iteration % c.every == 0 and self.iteration < tc.iterations:
                self._save()
        bar.close()
        self._finish()
        return self.metrics.history

    def _finish(self):
        out = Path(self.cfg.train.out_dir)
        self.metrics.plot()
        self.metrics.close()
        if self.cfg.checkpoint.dir:
            self._save()
        adapter_dir = out / "final_adapter"  # peft (lora.load_adapter); final_lora.safetensors: ComfyUI, diffusers
        save_adapter(self.model, self.cfg.lora, adapter_dir, comfyui_file=out / "final_lora.safetensors")
        if self.ema is not None:
            with self.ema.applied():
                save_adapter(self.model, self.cfg.lora, out / "final_adapter_ema")
        self.samples.close()
        if self.archive is not None:
            self.archive.close()
        log.info("done: metrics %s, plot %s, adapter %s", out / "metrics.jsonl", out / "reward_curve.png", adapter_dir)
