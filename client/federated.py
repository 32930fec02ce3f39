"""A hospital's part in the federated study, still without Flower.

:class:`FederatedSite` answers the centre's requests in each phase — a round of local training
from the global weights, and the local sums behind every secure aggregation (clinical
statistics, the clinical encoder, the SVM objective, the evaluation histograms). Each answer is
an aggregate over the site's cases: no image, embedding or clinical value leaves through it.
The Flower ClientApp is a thin adapter over this class; tests call it directly.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cldlr.client.federated_measures import MEASURE_TASKS, measure_answers
from cldlr.client.policy import SitePolicy, check_class_counts, check_histogram_ranges
from cldlr.client.site import SiteSession
from cldlr.common.clinical.features import ClinicalEncoder, encoder_sums
from cldlr.common.config import Config
from cldlr.common.errors import CldlrError
from cldlr.common.evaluation import secure_metrics
from cldlr.common.evaluation.layout import evaluation_layout
from cldlr.common.fusion import NOISY_CLINICAL_VALUE_BOUND, FusionPayload, fusion_models_from_payload, site_sums
from cldlr.common.io import atomic_path, atomic_write_json
from cldlr.common.models.backbones import build_model
from cldlr.common.models.weights import arrays_to_model, arrays_to_tensors, model_to_arrays
from cldlr.common.secure.dp_plan import StudyPlan
from cldlr.common.secure.payload import answer_batch, selection_from_payload
from cldlr.common.secure.tasks import BATCH_TASK, CLINICAL_STATS, ENCODER_SUMS, FUSION_SUMS, PLACEMENT_SUMS, SCORE_HISTOGRAMS

if TYPE_CHECKING:  # Opacus-heavy: imported at run time only by DP studies
    from cldlr.client.federated_evaluation import ExternalScores
    from cldlr.client.privacy import SitePrivacy
    from cldlr.client.privacy_ledger import LifetimeLedger
    from cldlr.client.sum_noise import SumNoiser

log = logging.getLogger(__name__)

FINAL_MODEL = "final-global.safetensors"
MODEL_ID = "model_id"  # a fresh id per final model, in its metadata and in every cache derived from it


class FederatedSite:
    """One site's state across the phases of a federated run."""

    def __init__(self, session: SiteSession, config: Config, state_dir: Path | None = None, *,
                 policy: SitePolicy | None = None, run_id: str | int | None = None) -> None:
        self.session = session
        self.config = config
        # the hospital's own rules (never the centre's): what may leave, the lifetime ε cap, its folders
        self.policy = policy
        self.run_id = None if run_id is None else str(run_id)  # Flower's run id: the lifetime ledger's entry
        # Flower may hand consecutive messages of one site to different processes (Ray actors in
        # simulation, a fresh ClientApp process per run in deployment): whatever must outlive a
        # message lives in files under state_dir, on the site's own disk.
        self.state_dir = state_dir
        torch.manual_seed(config.run.seed)
        self.model = build_model(config.model)
        self.privacy: SitePrivacy | None = None
        self.ledger: LifetimeLedger | None = None
        # whole-study DP: the plan the study states (checked against the cap below, with DP-SGD's)
        self.plan = StudyPlan.from_config(config) if config.privacy.enabled and config.privacy.secure_sums.enabled else None
        self._noiser: SumNoiser | None = None
        if config.privacy.enabled:
            from cldlr.client.privacy import SitePrivacy, check_private_compatible

            check_private_compatible(self.model)
            self.privacy = SitePrivacy.from_config(
                config.privacy, n_train=session.n_backbone, batch_size=config.train.batch_size,
                total_epochs=config.federation.rounds * config.federation.local_epochs, seed=config.run.seed,
                max_physical_batch=config.privacy.max_physical_batch or None,
            )
            if policy is not None:
                self.ledger = self._lifetime_ledger(policy, self.privacy)
        self._embeddings: dict[str, np.ndarray] | None = None
        self._fusion_cache: dict[str, Any] = {}
        self._final_loaded = False
        self._final_id: str | None = None
        # an evaluation-only study (federation.mode=evaluate): the bundle's scores of the site's rows
        self.external: ExternalScores | None = None

    def _state_file(self, name: str) -> Path | None:
        if self.state_dir is None:
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self.state_dir / name

    @property
    def name(self) -> str:
        """The site's name in logs, the audit file and (once joined) the centre's report."""
        return self.session.name

    # -- DP-SGD budgets: this run's (privacy.json) and the dataset's lifetime one (the ledger) ---------
    def _lifetime_ledger(self, policy: SitePolicy, privacy: SitePrivacy) -> LifetimeLedger:
        """The data's ledger in the site's own state folder; refuses a study whose whole plan would pass the cap."""
        from cldlr.client.privacy_ledger import LifetimeLedger, dataset_key

        if self.run_id is None:
            raise CldlrError(f"site {self.name}: a DP study under the site's policy needs the run id for the lifetime "
                             "privacy ledger; build FederatedSite with run_id=context.run_id")
        ledger = LifetimeLedger(policy.state_dir, dataset_key(self.session.site), delta=policy.dp.delta,
                                cap=policy.dp.epsilon_cap)
        plan, fed = privacy.plan, self.config.federation  # the whole plan: a restart re-checks the same one
        sums = "" if self.plan is None else f" and {sum(self.plan.releases.values())} noisy secure sums"
        ledger.check([privacy.planned(plan.total_epochs)], without=self.run_id,
                     planned_rdp=None if self.plan is None else self.plan.sums_rdp(), what=(
            f"site {self.name}: run {self.run_id} ({fed.rounds} rounds × {fed.local_epochs} local epochs × "
            f"{plan.steps_per_epoch} steps at σ={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}{sums})"))
        return ledger

    # -- whole-study DP: the noise share on every secure sum, and ε per phase ------------------------
    def sum_noiser(self) -> SumNoiser | None:
        """The site's noiser of secure sums (None: the study plans no noise on them)."""
        if self.plan is None:
            return None
        if self._noiser is None:
            from cldlr.client.policy import SitePolicy
            from cldlr.client.sum_noise import LedgerBook, MemoryBook, SumNoiser

            book = LedgerBook(self.ledger, self.run_id) if self.ledger is not None and self.run_id is not None \
                else MemoryBook()
            self._noiser = SumNoiser(self.plan, self.policy or SitePolicy(), book, cases=self.release_cases,
                                     schema=self.session.site.schema)
        return self._noiser

    def release_cases(self, task: str, payload: Mapping[str, Any]) -> int:
        """The case count ``d`` a release's per-site bounds are divided by to bound one patient's part.

        The protocol's bounds are (a count of cases) × (one patient's largest contribution); the
        count is the largest site's cases (fusion, clinical, score histograms) or a class's global
        count (placements). The site's own count of what it releases is never larger, so dividing
        by it over-states, never under-states, a patient's part.
        """
        cohorts = self.released_cohorts(task, payload)
        # the rows the release sums over: fusion.fit_on=holdout fits and scores the fusion on the hold-out only
        fused = task in (FUSION_SUMS, SCORE_HISTOGRAMS, PLACEMENT_SUMS)
        labels = [np.asarray(self._labels(c) if fused else self.session.cohort(c).labels) for c in cohorts]
        if task == PLACEMENT_SUMS:
            return max(1, min(int(np.sum(y == k)) for y in labels for k in (0, 1)))
        return max(1, sum(len(y) for y in labels))

    def privacy_summary(self) -> dict[str, Any]:
        """ε per phase and in total for this run (at the policy's δ), the plan and the cap: the report's rows."""
        if self.ledger is None or self.run_id is None:
            return {}
        out: dict[str, Any] = {"phases": self.ledger.phase_epsilons(self.run_id), "delta": self.ledger.delta,
                               "cap": self.ledger.cap}
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        return out

    def _record_privacy(self, privacy: SitePrivacy) -> None:
        """Keep the run's accountant history in the lifetime ledger (first) and ``privacy.json``: no step is lost."""
        if self.ledger is not None and self.run_id is not None and self.ledger.run_history(self.run_id) != privacy.history:
            self.ledger.record(self.run_id, privacy.history, site=self.name, steps=privacy.steps,
                               planned_steps=privacy.plan.total_epochs * privacy.plan.steps_per_epoch,
                               delta=self.ledger.delta, cap=self.ledger.cap, study_delta=privacy.plan.delta)
        if (path := self._state_file("privacy.json")) is not None:
            atomic_write_json(path, privacy.state_dict())

    def _check_privacy(self, privacy: SitePrivacy, epochs: int, server_round: int) -> None:
        """Continue this run's accountant from what the files hold; refuse a round past either budget."""
        saved = self._state_file("privacy.json")
        if saved is not None and saved.is_file():  # the file is the truth: another process may have trained last
            privacy.load_state_dict(json.loads(saved.read_text()))
        if self.ledger is not None and self.run_id is not None:
            privacy.continue_history(self.ledger.run_history(self.run_id))  # the longer of the two wins
            self._record_privacy(privacy)  # the ledger now holds exactly this run's steps
        if privacy.would_exceed(epochs):
            from cldlr.client.privacy import PrivacyBudgetError

            raise PrivacyBudgetError(
                f"site {self.name}: round {server_round} would exceed ε={self.config.privacy.target_epsilon} "
                f"(spent {privacy.epsilon():.3f}); the site stops training")
        if self.ledger is not None:
            self.ledger.check([privacy.planned(epochs)], what=f"site {self.name}: round {server_round} of run {self.run_id}")

    # -- phase 1: backbone ------------------------------------------------------------------
    def train_round(self, global_arrays: Mapping[str, np.ndarray], *, server_round: int,
                    proximal_mu: float = 0.0) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        """Local epochs from the global weights; returns (weights, number of examples, metrics)."""
        epochs = self.config.federation.local_epochs
        if self.privacy is not None:  # refused before the model is touched
            self._check_privacy(self.privacy, epochs, server_round)
        arrays_to_model(self.model, global_arrays)
        self._embeddings = None  # the backbone changes: embeddings must be recomputed
        self._final_loaded = False
        train = partial(self.session.fit_backbone, self.model, epochs=epochs, seed=self.config.run.seed + server_round - 1,
                        proximal_mu=proximal_mu, progress=False,
                        global_params=arrays_to_tensors(global_arrays) if proximal_mu > 0 else None)
        if self.privacy is None:
            result = train()
        else:
            with self.privacy.training() as hooks:  # Opacus hooks are removed again afterwards
                result = train(**hooks)
            self._record_privacy(self.privacy)
        last = result.history[-1] if result.history else {}
        metrics = {"train-loss": float(last.get("loss", float("nan"))),
                   "train-accuracy": float(last.get("accuracy", float("nan")))}
        if self.privacy is not None:
            metrics["epsilon"] = float(self.privacy.epsilon())
            metrics["delta"] = float(self.config.privacy.delta)
        return model_to_arrays(self.model, self.config.federation.transfer_dtype), self.session.n_backbone, metrics

    def set_global_model(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Load the final global backbone (phases 3 and 4 embed with it) and keep a copy on disk."""
        arrays_to_model(self.model, global_arrays)
        self._embeddings = None
        self._final_loaded = True
        self._final_id = uuid.uuid4().hex
        if (path := self._state_file(FINAL_MODEL)) is not None:
            # the caches name the model they came from: one left by a crash before the unlink below is ignored
            with atomic_path(path) as tmp:
                save_file({k: np.ascontiguousarray(v, dtype=np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                           else np.ascontiguousarray(v) for k, v in global_arrays.items()}, str(tmp),
                          metadata={MODEL_ID: self._final_id})
            for stale in ("embeddings.npz", "fusion.npz"):
                self._state_file(stale).unlink(missing_ok=True)

    def _final_model_id(self) -> str:
        """The id of the final model on disk (read from its header; '' when there is none or it has none)."""
        if self._final_id is None:
            path = self._state_file(FINAL_MODEL)
            if path is None or not path.is_file():
                return ""
            with safe_open(str(path), framework="numpy") as handle:
                self._final_id = (handle.metadata() or {}).get(MODEL_ID, "")
        return self._final_id or ""

    def _current(self, saved: Any) -> bool:
        """Whether a cache file (an open ``.npz``) was derived from the final model now on disk."""
        return MODEL_ID in saved.files and str(saved[MODEL_ID]) == self._final_model_id() != ""

    def _final_model(self) -> None:
        if self._final_loaded:
            return
        path = self._state_file(FINAL_MODEL)
        if path is None or not path.is_file():
            raise CldlrError(f"site {self.name} has no final global model yet (phase order broken?)")
        arrays_to_model(self.model, load_file(str(path)))
        self._final_loaded = True

    def feature_bound(self) -> float:
        """The power of two above the largest |embedding value| of the training cohort.

        The centre needs a bound to scale the secure sums of deep features; a power of two tells
        it the order of magnitude and nothing finer.
        """
        largest = float(np.abs(self.embeddings("train")).max(initial=0.0))
        return float(2.0 ** np.ceil(np.log2(max(largest, 1e-6))))

    def embeddings(self, split: str) -> np.ndarray:
        """Embeddings of the final global backbone (computed once; kept in the site's state folder)."""
        if self._embeddings is None:
            path = self._state_file("embeddings.npz")
            if path is not None and path.is_file():
                with np.load(path) as saved:
                    if self._current(saved):
                        self._embeddings = {k: saved[k] for k in ("train", "test")}
            if self._embeddings is None:
                self._final_model()
                self._embeddings = {s: self.session.embeddings(self.model, s) for s in ("train", "test")}
                if path is not None:
                    with atomic_path(path) as tmp:
                        np.savez(tmp, **self._embeddings, **{MODEL_ID: np.array(self._final_model_id())})
        return self._embeddings[split]

    # -- phase 2: clinical selection and encoder ---------------------------------------------
    def clinical_statistics(self, payload: Mapping[str, Any]) -> np.ndarray:
        """Per-class sums of the clinical parameters; the centre's histogram ranges must suit the site's policy."""
        ranges = {k: (float(v[0]), float(v[1])) for k, v in payload.get("histogram_ranges", {}).items()}
        stats = self.session.clinical_statistics(ranges or None, noisy=self.plan is not None)
        if self.policy is not None:  # the bin count always; ranges the centre chose: inside the schema, not too fine
            frame = self.session.train.site.frame
            spread = {name: float(np.nanstd(np.asarray(frame[name], dtype=np.float64))) for name in ranges if name in frame}
            check_histogram_ranges(self.policy, self.session.site.schema, ranges, stats.layout.n_bins, spread)
        return stats.to_vector()

    def encoder_sums(self, payload: Mapping[str, Any]) -> np.ndarray:
        """Count, Σz and Σz² of the selected parameters' encodings (the centre standardizes from them)."""
        frame, schema = self.session.clinical_view(noisy=self.plan is not None)
        return encoder_sums(frame, [schema.get(n) for n in selection_from_payload(payload)])

    def _clinical(self, payload: Mapping[str, Any], split: str) -> np.ndarray:
        """The standardized clinical block; under whole-study DP clipped to the protocol's per-patient bound."""
        encoder = ClinicalEncoder.from_dict(payload["encoder"])
        block = self.session.clinical_block(encoder, split)
        if self.plan is not None:  # a patient's part of every fusion sum is then what the noise assumes
            block = np.clip(block, -NOISY_CLINICAL_VALUE_BOUND, NOISY_CLINICAL_VALUE_BOUND)
        return block

    # -- phase 3: SVM fusion ----------------------------------------------------------------
    def _load_fusion_cache(self) -> dict[str, Any]:
        # the file is the truth: another process may have answered the previous round of this site
        path = self._state_file("fusion.npz")
        if path is not None and path.is_file():
            self._fusion_cache.clear()
            with np.load(path) as saved:
                if self._current(saved):  # arrays of a fit against an earlier final model are not this fit's
                    self._fusion_cache.update({"fit_id": str(saved["fit_id"]),
                                               "arrays": {k[2:]: saved[k] for k in saved.files if k.startswith("a:")}})
        return self._fusion_cache

    def _save_fusion_cache(self) -> None:
        path = self._state_file("fusion.npz")
        if path is not None and self._fusion_cache:
            with atomic_path(path) as tmp:
                np.savez(tmp, fit_id=np.array(self._fusion_cache["fit_id"]), **{MODEL_ID: np.array(self._final_model_id())},
                         **{f"a:{k}": v for k, v in self._fusion_cache["arrays"].items()})

    def fusion_sums(self, payload: Mapping[str, Any]) -> np.ndarray:
        """The site's sums for the current round of the secure SVM fit (the request keeps earlier arrays)."""
        request = FusionPayload.decode(payload, self._load_fusion_cache())
        self._save_fusion_cache()
        rows = self.session.fusion_view("train")  # fusion.fit_on=holdout: only rows the backbone never saw
        clinical = self._clinical(payload, "train")[rows]
        return site_sums(request, clinical, self.embeddings("train")[rows], self.session.train.labels[rows],
                         noisy=self.plan is not None)

    # -- phase 4: evaluation ----------------------------------------------------------------
    def _labels(self, split: str) -> np.ndarray:
        if self.external is not None:
            return self.external.labels(split)
        return self.session.cohort(split).labels[self.session.fusion_view(split)]

    def _scores(self, payload: Mapping[str, Any], split: str) -> dict[str, np.ndarray]:
        if self.external is not None:
            return self.external.scores(split)
        fusion = fusion_models_from_payload(payload, self._load_fusion_cache())
        rows = self.session.fusion_view(split)
        return fusion.predict_proba(self._clinical(payload, split)[rows], self.embeddings(split)[rows])

    def scored(self, payload: Mapping[str, Any], split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and per-model scores of a cohort's evaluated cases (what every evaluation release sums over)."""
        return self._labels(split), self._scores(payload, split)

    def score_histograms(self, payload: Mapping[str, Any]) -> np.ndarray:
        """Per cohort and model: per-class score histograms (the centre sees only their sum)."""
        layout = evaluation_layout(payload)
        parts = []
        for split in layout.cohorts:
            scores = self._scores(payload, split)
            labels = self._labels(split)
            for model in layout.models:
                parts.append(secure_metrics.score_histograms(labels, scores[model], layout.n_bins).ravel())
        return np.concatenate(parts).astype(np.float64)

    def placement_sums(self, payload: Mapping[str, Any]) -> np.ndarray:
        """DeLong placement sums against the global histograms, per cohort (second evaluation round)."""
        layout = evaluation_layout(payload)
        global_hists = layout.unpack_histograms(np.asarray(payload["histograms"], dtype=np.float64))
        parts = []
        for split in layout.cohorts:
            scores = self._scores(payload, split)
            labels = self._labels(split)
            sums = secure_metrics.placement_sums(labels, {m: scores[m] for m in layout.models},
                                                 global_hists[split], layout.n_bins)
            parts.append(layout.pack_placements(sums))
        return np.concatenate(parts)

    def _min_count(self) -> int:
        """Fewest cases of a class in a cohort the site reports on: the study's and its policy's minimum."""
        policy_min = self.policy.min_class_count if self.policy is not None else 0
        return max(self.config.evaluation.min_count, policy_min)

    def local_metrics(self, payload: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
        """The federation's models scored on this site's own cohorts, written to its state folder.

        The file stays at the site; the ClientApp shares it only when the site opts in. A cohort
        with fewer than ``evaluation.min_count`` cases of a class (or the policy's
        ``min_class_count``) is left out (too few patients to publish anything about them).
        """
        from cldlr.common.evaluation.metrics import model_metrics

        out: dict[str, dict[str, dict[str, float]]] = {}
        for split in ("train", "test"):
            labels = self._labels(split)
            if labels.size == 0 or not secure_metrics.local_report_allowed(labels, self._min_count()):
                continue
            for model, prob in self._scores(payload, split).items():
                out.setdefault(model, {})[split] = model_metrics(labels, prob, self.config.svm.threshold)
        if (path := self._state_file("local-report.json")) is not None:
            atomic_write_json(path, {"site": self.name, "metrics": out})
            log.info("site %s: its own metrics are in %s", self.name, path)
        return out

    def released_cohorts(self, task: str, payload: Mapping[str, Any]) -> tuple[str, ...]:
        """The cohorts whose cases a task's answer sums over (the evaluation's layout names its own)."""
        if task in (SCORE_HISTOGRAMS, PLACEMENT_SUMS, *MEASURE_TASKS):
            return tuple(evaluation_layout(payload).cohorts)
        return ("train",)

    def check_release(self, task: str, payload: Mapping[str, Any]) -> None:
        """Refuse a task over a cohort with fewer cases of a class than the site's policy allows."""
        if self.policy is None:
            return
        counts = {}
        for split in self.released_cohorts(task, payload):
            labels = np.asarray(self._labels(split))
            counts[split] = (int(np.sum(labels == 0)), int(np.sum(labels == 1)))
        check_class_counts(self.policy, counts)

    def tasks(self) -> dict[str, Any]:
        """Secure-sum task name → callable(payload) returning this site's vector (checked against the policy)."""
        answers: dict[str, Any] = {
            CLINICAL_STATS: self.clinical_statistics,
            ENCODER_SUMS: self.encoder_sums,
            FUSION_SUMS: self.fusion_sums,
            SCORE_HISTOGRAMS: self.score_histograms,
            PLACEMENT_SUMS: self.placement_sums,
            **measure_answers(self.scored),
        }
        tasks = {name: partial(self._checked_answer, name, fn) for name, fn in answers.items()}
        tasks[BATCH_TASK] = partial(answer_batch, tasks)
        return tasks

    def _checked_answer(self, task: str, fn: Any, payload: Mapping[str, Any]) -> np.ndarray:
        if self.external is not None:  # an evaluation-only study: the evaluation sums only
            from cldlr.client.federated_evaluation import check_evaluation_request

            check_evaluation_request(task)
        self.check_release(task, payload)
        return fn(payload)
