"""The hospital's own privacy policy: what this site will compute and send, whatever the centre asks.

A SuperNode reads the policy from a YAML file its operator names (``cldlr deploy supernode
--policy FILE``; ``configs/policy/site.yaml`` is a commented default). Nothing in it comes from
the centre: the centre's study configuration is checked *against* it before the site computes or
sends anything, and every later request (a secure round's SecAgg+ parameters, a histogram's bins, a
repeated sum) is checked again when it arrives. A refusal answers the centre with a short generic
reason; the details stay in the site's log and audit file.

This module knows nothing of Flower: the ClientApp hands it plain numbers and strings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cldlr.common.config import Config
from cldlr.common.data.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cldlr.common.data.schema import Schema
from cldlr.common.errors import CldlrError, ConfigError
from cldlr.common.io import read_yaml
from cldlr.common.typed import build_dataclass

log = logging.getLogger(__name__)


class PolicyRefusal(CldlrError):
    """A request this site's policy does not allow.

    ``public`` is what the centre is told (no values, no counts); ``detail`` is for the site's
    own log and audit file.
    """

    def __init__(self, public: str, detail: str) -> None:
        super().__init__(f"refused by the site's policy: {public}")
        self.public = public
        self.detail = detail


@dataclass(frozen=True)
class DPPolicy:
    """Differential privacy the site insists on, and its lifetime budget per dataset."""

    required: bool = False  # refuse a study that trains the backbone without DP-SGD
    epsilon_cap: float = 10.0  # lifetime ε over every run on the same data (composed across runs)
    delta: float = 1e-5  # the δ at which this site states ε; a study may not ask for a larger δ
    # noise on every secure sum (privacy.secure_sums): "when_planned" adds the site's share when the
    # study plans it; "required" also refuses a study that does not
    sum_noise: Literal["when_planned", "required"] = "when_planned"
    # the honest sites a noise share assumes: "listed" = every site of the round (unmask refused if
    # one drops out after the noise was added); "min_parties" = the policy's minimum (larger shares)
    noise_split: Literal["listed", "min_parties"] = "listed"


@dataclass(frozen=True)
class SiteFolders:
    """Where the site keeps its cache, state (accountant, ledgers, audit) and logs; never the centre's choice."""

    state: str = ""
    cache: str = ""  # empty: <state>/cache
    logs: str = ""  # empty: <state>/logs


@dataclass(frozen=True)
class SitePolicy:
    """Everything the hospital decides about what leaves it (see ``configs/policy/site.yaml``)."""

    min_parties: int = 3  # fewest sites in any release: SecAgg+ group, shares, and a sum's contributors
    allow_single_site: bool = False  # plaintext answers of this site alone (a one-site study) only if true
    min_class_count: int = 5  # fewest cases of each class this site puts into any release
    max_histogram_bins: int = 1000  # most bins in one clinical histogram (the protocol's own passes use 1000)
    finest_bin_sd: float = 0.005  # no bin narrower than this fraction of the site's own SD of the parameter (0: no floor)
    max_rounds: int = 500  # most training rounds one study may ask for
    share_training_metrics: bool = False  # per-round train loss/accuracy (never under DP)
    share_local_metrics: bool = False  # the site's own scores of the final models on its cohorts
    schema: str = ""  # the site's own copy of the federation schema; the centre's must equal it
    approved_fabs: tuple[str, ...] = ()  # sha256 of the Flower app bundles (FABs) this site runs
    trusted_bundle_signers: tuple[str, ...] = ()  # PEM files (CA or signer cert, public key) model bundles must verify against
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # most pixels an image header may declare (before decoding)
    # evaluation-only studies (federation.mode=evaluate): the site's own copy of the bundle it agrees to score
    # (empty: it scores none), and the rows it lets one score ("test": its test split only)
    evaluation_bundle: str = ""
    evaluate_rows: Literal["all", "test"] = "all"
    dp: DPPolicy = field(default_factory=DPPolicy)
    folders: SiteFolders = field(default_factory=SiteFolders)

    def bundle_trust_files(self, base: Path | None = None) -> list[Path]:
        """The PEM files of ``trusted_bundle_signers``; relative entries are taken from ``base`` (the policy's folder)."""
        paths = [Path(p).expanduser() for p in self.trusted_bundle_signers]
        return [p if p.is_absolute() or base is None else base / p for p in paths]

    @property
    def state_dir(self) -> Path:
        """The site's state folder (accountant history, release ledger, audit log)."""
        return Path(self.folders.state).expanduser()

    @property
    def cache_dir(self) -> Path:
        """The decoded-ROI cache, kept at the site."""
        return Path(self.folders.cache).expanduser() if self.folders.cache else self.state_dir / "cache"

    @property
    def log_dir(self) -> Path:
        """Where the site's log files go."""
        return Path(self.folders.logs).expanduser() if self.folders.logs else self.state_dir / "logs"


def policy_from_dict(data: Mapping[str, Any], source: str = "policy") -> SitePolicy:
    """Build and check a policy; unknown keys, wrong types and impossible values are errors naming the key."""
    try:
        policy: SitePolicy = build_dataclass(SitePolicy, dict(data), "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    checks = [
        (policy.min_parties >= 2, "min_parties must be >= 2 (a sum of one site is that site's data)"),
        (policy.min_class_count >= 1, "min_class_count must be >= 1"),
        (policy.max_histogram_bins >= 2, "max_histogram_bins must be >= 2"),
        (policy.finest_bin_sd >= 0 and math.isfinite(policy.finest_bin_sd), "finest_bin_sd must be a finite number >= 0"),
        (policy.max_rounds >= 1, "max_rounds must be >= 1"),
        (policy.max_image_pixels >= 1, "max_image_pixels must be >= 1"),
        (policy.dp.epsilon_cap > 0 and math.isfinite(policy.dp.epsilon_cap), "dp.epsilon_cap must be a finite number > 0"),
        (0 < policy.dp.delta < 1, "dp.delta must be in (0, 1)"),
        (bool(policy.folders.state), "folders.state must name the site's own state folder"),
        (bool(policy.schema), "schema must name the site's own copy of the federation schema file"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    for digest in policy.approved_fabs:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{source}: approved_fabs entry {digest!r} is not a lowercase sha256 hex digest "
                              "(print one with `cldlr deploy fab-hash APP_DIR`)")
    return policy


def load_policy(path: str | Path) -> SitePolicy:
    """Read the site's policy file (the SuperNode's ``policy`` node config)."""
    data = read_yaml(path, ConfigError, "pass the site's policy file, e.g. a copy of configs/policy/site.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the policy must be a mapping of keys")
    return policy_from_dict(data, source=str(path))


def _refuse(public: str, detail: str) -> PolicyRefusal:
    log.warning("policy refusal: %s (%s)", public, detail)
    return PolicyRefusal(public, detail)


def check_study(policy: SitePolicy, config: Config, centre_schema: Schema, site_schema: Schema) -> None:
    """Refuse a study whose configuration this site's policy does not allow (at the handshake)."""
    fed, dp = config.federation, config.privacy
    if centre_schema.fingerprint() != site_schema.fingerprint():
        raise _refuse("the federation schema differs from the site's own",
                      f"centre {centre_schema.name!r} {centre_schema.fingerprint()}, site {policy.schema} "
                      f"{site_schema.fingerprint()}")
    if fed.num_sites < policy.min_parties and not (fed.num_sites == 1 and policy.allow_single_site):
        raise _refuse("too few sites in the study",
                      f"federation.num_sites={fed.num_sites} < min_parties={policy.min_parties}")
    if fed.rounds > policy.max_rounds:
        raise _refuse("too many training rounds", f"federation.rounds={fed.rounds} > max_rounds={policy.max_rounds}")
    if policy.dp.required and not dp.enabled and fed.mode != "evaluate":  # an evaluation-only study trains nothing
        raise _refuse("the site requires DP-SGD training", "privacy.enabled is false")
    if fed.num_sites == 1 and dp.enabled and dp.secure_sums.enabled:
        raise _refuse("whole-study DP needs secure sums over several sites",
                      "a one-site study sends its sums in plaintext, without the noise shares of SecAgg+ sums")
    if policy.dp.sum_noise == "required" and not (dp.enabled and dp.secure_sums.enabled):
        raise _refuse("the site requires DP noise on every secure sum", "privacy.secure_sums.enabled is false")
    if dp.enabled and dp.delta > policy.dp.delta:
        raise _refuse("the study's δ is larger than the site allows",
                      f"privacy.delta={dp.delta:g} > dp.delta={policy.dp.delta:g}")


def check_secagg_group(policy: SitePolicy, *, sample_num: int, share_num: int, threshold: int) -> None:
    """Refuse a SecAgg+ round whose group could expose this site's vector (checked at its setup stage).

    The sum must cover at least ``min_parties`` sites, the site's mask must be shared with at least
    that many, and reconstructing it must take a majority of those shares (fewer would let a
    minority of colluding nodes, e.g. SuperNodes the centre registered itself, unmask it).
    """
    if sample_num < policy.min_parties:
        raise _refuse("secure round over too few sites", f"sample_num={sample_num} < min_parties={policy.min_parties}")
    if share_num < min(policy.min_parties, sample_num):
        raise _refuse("secure round with too few shares", f"share_num={share_num} < min_parties={policy.min_parties}")
    if threshold * 2 <= share_num or threshold < 2:
        raise _refuse("secure round with too low a reconstruction threshold",
                      f"threshold={threshold} is not a majority of share_num={share_num}")


def check_neighbours(policy: SitePolicy, neighbours: int) -> None:
    """Refuse to share keys with fewer live neighbours (this site included) than the policy's minimum."""
    if neighbours < policy.min_parties:
        raise _refuse("secure round over too few sites", f"{neighbours} neighbours < min_parties={policy.min_parties}")


def check_histogram_ranges(policy: SitePolicy, schema: Schema, ranges: Mapping[str, tuple[float, float]],
                           bins: int, spread: Mapping[str, float] | None = None) -> None:
    """Refuse histograms with too many bins, ranges outside the schema's, or bins finer than the data warrant.

    ``spread`` is the site's own SD of each parameter (training cohort). The protocol's second pass
    bins the pooled mean ± 5 SD into ``bins`` bins, i.e. bins of about SD/100; a centre that asks for
    bins far below the site's own SD (0.01-year age bins, say) is asking for single patients' values.
    """
    if bins > policy.max_histogram_bins:
        raise _refuse("histogram with more bins than the site allows",
                      f"{bins} bins > max_histogram_bins={policy.max_histogram_bins}")
    for name, (low, high) in ranges.items():
        parameter = schema.get(name)
        if parameter.range is None:
            raise _refuse("histogram over a parameter without a schema range", f"{name} has no range in the schema")
        s_low, s_high = parameter.range
        if not (math.isfinite(low) and math.isfinite(high) and s_low <= low < high <= s_high):
            raise _refuse("histogram range outside the schema's", f"{name}: [{low}, {high}] not inside [{s_low}, {s_high}]")
        sd = float((spread or {}).get(name, float("nan")))
        finest = policy.finest_bin_sd * sd
        if math.isfinite(finest) and finest > 0 and (high - low) / bins < finest * (1 - 1e-9):
            raise _refuse("histogram bins finer than the site allows", f"{name}: bin width {(high - low) / bins:g} < "
                          f"{finest:g} ({policy.finest_bin_sd:g} × this site's SD {sd:g})")


def check_class_counts(policy: SitePolicy, counts: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a release over a cohort with fewer cases of a class than the policy's minimum."""
    for cohort, (benign, malignant) in counts.items():
        if min(benign, malignant) < policy.min_class_count:
            raise _refuse("too few cases of a class at this site",
                          f"{cohort}: {benign} benign / {malignant} malignant < min_class_count={policy.min_class_count}")
