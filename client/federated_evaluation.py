"""A site's part in an evaluation-only federated study (``federation.mode: evaluate``): score a bundle it holds.

The bundle never travels with the study: the site loads **its own copy**, from the path its
policy names (``evaluation_bundle``; in simulation the study's ``federation.evaluate_bundle``),
verifies every file against the bundle's manifest and its signature against the signers the
policy trusts (``trusted_bundle_signers``; :func:`cldlr.client.evaluate.open_bundle`, the one place
``cldlr evaluate`` opens a bundle) and compares the bundle id with the one the centre offers; a
site without a bundle, with another one, or with one nobody it trusts signed refuses to join
(:func:`site_bundle`). The centre
sends no weights and the site scores nothing it was not given by its own operator.

The rows scored: all of the site's cohort (``federation.evaluate_rows: all``, the default: an
external site's cases never trained the model), or its test split only — the study's or the
site policy's ``evaluate_rows: test`` (the stricter wins). :class:`ExternalScores` holds the
bundle's scores of those rows as the site's ``test`` cohort, the one every evaluation sum of the
study covers; they are scored once and kept in the site's state folder. Flower-free.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cldlr.client.federated_measures import MEASURE_TASKS
from cldlr.client.policy import PolicyRefusal, SitePolicy
from cldlr.client.site import SiteSession
from cldlr.common.bundle import BundleError, TrustAnchor
from cldlr.common.config import Config
from cldlr.common.io import atomic_path
from cldlr.common.secure.tasks import PLACEMENT_SUMS, SCORE_HISTOGRAMS

log = logging.getLogger(__name__)

#: Score columns of :func:`cldlr.client.evaluate.score_site` per model key.
COLUMNS = {"cldlr": "ai_score", "dlr": "dlr_score", "clinical": "clinical_score"}
SCORES_FILE = "external-scores.npz"


def evaluate_rows(policy: SitePolicy | None, config: Config) -> str:
    """``test`` when the study or the site's policy restricts scoring to the test split, else ``all``."""
    if config.federation.evaluate_rows == "test" or (policy is not None and policy.evaluate_rows == "test"):
        return "test"
    return "all"


def site_trust(policy: SitePolicy) -> TrustAnchor | None:
    """What the site trusts to sign the bundles it scores (its policy's ``trusted_bundle_signers``)."""
    files = policy.bundle_trust_files()
    return TrustAnchor.from_files(files) if files else None


def site_bundle(policy: SitePolicy, offered_id: str) -> Path:
    """The site's own bundle when a signer it trusts signed it and its id is the one the centre offers.

    Otherwise a refusal (at the handshake): no bundle in the policy, one that fails its manifest or
    signature check (an unsigned bundle included: a site scores only what someone it trusts vouches
    for), or another bundle than the centre's.
    """
    from cldlr.client.evaluate import open_bundle

    if not policy.evaluation_bundle:
        raise PolicyRefusal("an evaluation-only study of a bundle this site was not given",
                            "the site policy names no evaluation_bundle")
    path = Path(policy.evaluation_bundle).expanduser()
    try:
        bundle_id = open_bundle(path, trust=site_trust(policy)).bundle_id
    except BundleError as exc:
        raise PolicyRefusal("the site cannot verify its copy of the bundle", str(exc)) from None
    if bundle_id != offered_id:
        raise PolicyRefusal("the centre's bundle is not the one this site holds",
                            f"centre offers bundle {offered_id[:16]}…, the site's {path} is {bundle_id[:16]}…")
    return path


class ExternalScores:
    """The bundle's scores of the site's evaluation rows, as its ``test`` cohort (``train`` is the rest)."""

    def __init__(self, session: SiteSession, bundle: Path, bundle_id: str, rows: str, state_dir: Path | None,
                 trust: TrustAnchor | None = None) -> None:
        self.session, self.bundle, self.bundle_id, self.rows, self.trust = session, bundle, bundle_id, rows, trust
        self.state_file = None if state_dir is None else state_dir / SCORES_FILE
        self._scores: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._scores is not None:
            return self._scores
        if self.state_file is not None and self.state_file.is_file():
            with np.load(self.state_file) as saved:
                if str(saved["bundle_id"]) == self.bundle_id and str(saved["rows"]) == self.rows:
                    self._scores = {k: saved[k] for k in saved.files if k not in ("bundle_id", "rows")}
                    return self._scores
        from cldlr.client.evaluate import open_bundle, score_site

        bundle = open_bundle(self.bundle, trust=self.trust)
        if bundle.bundle_id != self.bundle_id:
            raise PolicyRefusal("the site's bundle changed during the study", f"{self.bundle} is now {bundle.bundle_id[:16]}…")
        table = score_site(bundle, self.session.site.root, label=f"{self.session.name} (evaluation)")
        frame = self.session.site.frame
        wanted = set(frame["image_id"].astype(str) if self.rows == "all"
                     else frame.loc[frame["split"] == "test", "image_id"].astype(str))
        keep = table["image_id"].astype(str).isin(wanted).to_numpy()
        scores = {"labels": table["label"].to_numpy(np.int64), "keep": keep}
        for model, column in COLUMNS.items():
            values = table[column].to_numpy(np.float64)
            if np.isfinite(values).all():
                scores[model] = values
        self._scores = scores
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.state_file) as tmp:
                np.savez(tmp, bundle_id=np.array(self.bundle_id), rows=np.array(self.rows), **scores)
        log.info("site %s: bundle %s scored on %d of its %d images (%s rows)", self.session.name, self.bundle_id[:12],
                 int(keep.sum()), keep.size, self.rows)
        return scores

    def _rows(self, split: str) -> np.ndarray:
        keep = self._load()["keep"]
        return keep if split == "test" else ~keep

    def labels(self, split: str) -> np.ndarray:
        """Labels of the evaluation rows (``test``) or of the rows left out (``train``)."""
        return self._load()["labels"][self._rows(split)]

    def scores(self, split: str) -> dict[str, np.ndarray]:
        """Per model of the bundle the site could score on every row (the clinical one needs every value)."""
        rows = self._rows(split)
        return {m: v[rows] for m, v in self._load().items() if m in COLUMNS}




def external_scores(session: SiteSession, policy: SitePolicy, config: Config, bundle_id: str,
                    state_dir: Path | None) -> ExternalScores:
    """The bundle's scores of this site's evaluation rows (a refusal as :func:`site_bundle` says)."""
    return ExternalScores(session, site_bundle(policy, bundle_id), bundle_id, evaluate_rows(policy, config), state_dir,
                          site_trust(policy))



#: The only sums a site answers in an evaluation-only study (it trains and fits nothing).
EVALUATION_TASKS = (SCORE_HISTOGRAMS, PLACEMENT_SUMS, *MEASURE_TASKS)


def check_evaluation_request(kind: str) -> None:
    """In an evaluation-only study, refuse what only a training study asks for (weights, clinical or SVM sums)."""
    if kind not in EVALUATION_TASKS:
        raise PolicyRefusal("a training request in an evaluation-only study",
                            f"{kind}: the site joined federation.mode=evaluate and only scores its bundle")


__all__ = ["COLUMNS", "EVALUATION_TASKS", "ExternalScores", "check_evaluation_request", "SCORES_FILE",
           "evaluate_rows", "external_scores", "site_bundle"]
