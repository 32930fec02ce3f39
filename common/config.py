"""One typed configuration: frozen dataclasses loaded from YAML plus ``--set a.b=value`` overrides.

The config is parsed once at the boundary (CLI, Flower app start) and then passed around as
typed objects; no dict of settings travels through the code. Paper defaults live in
``configs/paper.yaml``; the dataclass defaults below are the same values, so a YAML file only
needs to state what differs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cldlr.common.errors import ConfigError
from cldlr.common.io import read_yaml
from cldlr.common.typed import build_dataclass


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and what it is called."""

    name: str = "study"
    output_dir: str = "runs"
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"  # the CLI's -v/--log-level override it
    bundle_signer: str = ""  # folder with the centre's bundle-signer.key/.pem; empty: a study-local key signs the bundle


@dataclass(frozen=True)
class DataConfig:
    """Where the site data is and how ROIs are made from it (paper: 224 px, no margin)."""

    root: str = ""
    schema: str = ""
    image_size: int = 224
    margin: float = 0.0
    normalize: Literal["auto", "imagenet", "custom"] = "auto"
    mean: float = 0.5
    std: float = 0.25
    cache_dir: str = ".cache/cldlr"
    test_fraction: float = 0.3
    split_seed: int = 0
    use_existing_split: bool = True
    max_image_pixels: int = 8192 * 8192  # most pixels an image/mask header may declare (checked before decoding)


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and its initial weights: ``imagenet`` (torchvision cache), a state-dict path or ``none``."""

    backbone: str = "vgg11"
    weights: str = "imagenet"
    num_classes: int = 2


@dataclass(frozen=True)
class AugmentConfig:
    """``train.augment``: one switch and the range of each operation (0 turns one off)."""

    enabled: bool = False
    hflip: float = 0.5          # probability of a left-right flip
    vflip: float = 0.0          # probability of an up-down flip (depth runs downwards: off by default)
    rotate_deg: float = 10.0    # uniform in ±rotate_deg
    scale: float = 0.1          # zoom factor uniform in [1 - scale, 1 + scale]
    translate: float = 0.05     # shift uniform in ±translate of the side, per axis
    brightness: float = 0.1     # additive offset uniform in ±brightness
    contrast: float = 0.2       # contrast factor uniform in [1 - contrast, 1 + contrast]
    gamma: float = 0.2          # gamma log-uniform in [1/(1+gamma), 1+gamma]
    speckle: float = 0.1        # sd of multiplicative Gaussian noise

    def check(self) -> None:
        """Ranges that keep an image an image (see :mod:`cldlr.common.data.augment`); errors name the key."""
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.augment.{name} is a probability: give a value in [0, 1]")
        limits = {"rotate_deg": 180.0, "scale": 0.9, "translate": 0.5, "brightness": 1.0, "contrast": 0.9,
                  "gamma": 4.0, "speckle": 1.0}
        for name, top in limits.items():
            if not 0.0 <= getattr(self, name) <= top:
                raise ConfigError(f"train.augment.{name} must be in [0, {top:g}]")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings (paper: Adam, lr 0.005, 200 epochs, batch 16, softmax cross-entropy)."""

    epochs: int = 200
    batch_size: int = 16
    lr: float = 0.005
    weight_decay: float = 0.0
    keep: Literal["last", "best_val"] = "last"
    val_fraction: float = 0.2
    device: str = "auto"
    amp: bool = True
    checkpoint_every: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ClinicalConfig:
    """Selection of clinical parameters on the training cohort (paper: P < 0.05)."""

    alpha: float = 0.05
    normality_alpha: float = 0.05


@dataclass(frozen=True)
class SVMConfig:
    """The three SVMs and how the CLDLR fusion balances its deep and clinical blocks.

    ``solver: svc`` is scikit-learn's SVC (the paper); ``rff`` is a random-Fourier-feature
    approximation of the same RBF kernel with a least-squares objective, which is what the
    federation can fit from secure sums (the single-site pipeline offers it too, so a one-site
    federation reproduces it exactly).

    ``dp_fusion`` (for whole-study DP): linear LS-SVMs on norm-bounded blocks — the clinical block
    and ``embedding_pca`` deep components — whose one CLDLR release serves all three models
    (``cldlr.common.fusion.dp_linear``); needs ``solver: rff``, ``kernel: linear``,
    ``balance_blocks: true`` and ``embedding_pca >= 1`` (a few: each costs Gram entries, not Δ₂).
    """

    solver: Literal["svc", "rff"] = "svc"
    kernel: Literal["rbf", "linear"] = "rbf"
    C: float = 1.0
    gamma: str = "scale"
    embedding_pca: int = 16
    clinical_block_weight: float = 1.0
    balance_blocks: bool = True
    rff_features: int = 512
    ridge: float = 1.0
    threshold: float = 0.5
    dp_fusion: bool = False


@dataclass(frozen=True)
class ServerOptConfig:
    """The centre's optimizer of ``fedadam``/``fedyogi`` (Reddi et al., 2021), in Flower's parameter names.

    ``eta`` is the server learning rate, ``beta_1``/``beta_2`` the moment decays and ``tau`` the
    adaptivity; ``null`` keeps Flower's default for the chosen strategy (FedAdam: eta 0.1, FedYogi:
    eta 0.01; both beta_1 0.9, beta_2 0.99, tau 0.001). Flower's client learning rate ``eta_l`` has no
    counterpart: the sites train with ``train.lr``. Strategies without a server optimizer ignore this.
    """

    eta: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None


@dataclass(frozen=True)
class FusionConfig:
    """Which training images the three SVMs are fitted on (``fusion.fit_on``).

    ``train`` (the paper): every training image — the very images the backbone was fine-tuned on, whose
    embeddings are far more separable than a new patient's (DLR train AUC ≈ 0.98 against ≈ 0.71 on
    test), so the fusion learns to trust the deep block more than it deserves (stacking leakage).
    ``holdout``: a stratified, patient-disjoint ``holdout_fraction`` of each site's training cohort is
    kept from the backbone; the DLR and CLDLR SVMs and their calibration are fitted on its embeddings
    only, so no embedding used to fit the fusion comes from a backbone that trained on it. Clinical
    selection, the encoder and (pooled) the Clinical SVM still use the whole training cohort (the
    backbone never sees clinical values). In a federation each site holds out its own rows and the one
    secure fit of all three SVMs uses them; the secure sums are the same in kind.
    """

    fit_on: Literal["train", "holdout"] = "train"
    holdout_fraction: float = 0.3
    #: ``concat`` (the paper): CLDLR is one SVM on ``[clinical | embeddings]``. ``stack`` (needs
    #: ``fit_on: holdout``; pooled studies): CLDLR is a logistic regression on the Clinical and DLR models'
    #: out-of-fold decision values over the hold-out (``cldlr.common.fusion.stack``), so the deep model gets
    #: the weight it earns on patients it has not seen; ``stack_folds`` patient-grouped folds.
    combine: Literal["concat", "stack"] = "concat"
    stack_folds: int = 5


@dataclass(frozen=True)
class FederationConfig:
    """How sites are formed and how they train together.

    ``strategy`` names an entry of the centre's strategy registry (``cldlr.server.strategies``;
    checked against it before anything trains, since this module cannot import the server), and
    ``compare_strategies`` the federated arms of ``simulate --compare`` (empty: the registry's compared ones, FedAvg and FedProx).
    """

    #: ``evaluate``: no training — every site scores ``evaluate_bundle`` on its own cohort and the centre gets
    #: the measures from secure sums (an external, evaluation-only federated study)
    mode: Literal["pooled", "local", "federated", "evaluate"] = "federated"
    sites: tuple[str, ...] = ()
    partition: Literal["folders", "column", "iid", "dirichlet"] = "folders"
    partition_column: str = "device"
    num_sites: int = 3
    dirichlet_alpha: float = 0.5
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    compare_strategies: tuple[str, ...] = ()
    rounds: int = 10
    local_epochs: int = 1
    min_sites: int = 2
    transfer_dtype: Literal["float32", "float16"] = "float16"
    #: ``backbone`` stops after the training rounds and writes only the global backbone
    #: (``backbone.safetensors``, which ``model.weights`` takes): federated pretraining (``cldlr pretrain``)
    phases: Literal["all", "backbone"] = "all"
    # simulation only: an existing Ray cluster ("ray://host:10001" or "auto"), and what each virtual site gets
    ray_address: str = ""
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    #: ``mode: evaluate``: the bundle (a folder) the sites score; each site loads its own copy (its
    #: policy's ``evaluation_bundle``) and refuses one whose id differs from this bundle's
    evaluate_bundle: str = ""
    #: ``mode: evaluate``: the rows each site scores — all of its cohort, or only its test split (a site's
    #: policy may restrict it to its test split)
    evaluate_rows: Literal["all", "test"] = "all"
    #: ``mode: evaluate``: PEM files (the federation CA, the centre's bundle-signer.pem) the centre checks the
    #: bundle's signature against; simulated sites trust them too (default there: the study's model-signer.pem)
    evaluate_trust: tuple[str, ...] = ()
    #: ``simulate --compare``: leave-one-site-out arms too (train federated on N − 1 sites, test on the one left out)
    compare_loso: bool = False


@dataclass(frozen=True)
class SecureSumPrivacyConfig:
    """Whole-study DP: ε per phase of the secure sums, stated before the study starts (the study's plan).

    Each site adds its share of Skellam noise to every secure sum (:mod:`cldlr.common.secure.noise`);
    its ledger composes them with the backbone's DP-SGD (``privacy.target_epsilon``) at ``privacy.delta``.
    """

    enabled: bool = False
    clinical: float = 1.0  # the clinical statistics for selection (one release under noise)
    encoder: float = 0.5  # the clinical encoder's sums
    svm: float = 2.0  # moments, PCA sketches and the LS-SVM normal equations
    platt: float = 1.0  # Platt's histogram and Newton steps
    evaluation: float = 1.0  # score histograms and DeLong placement sums
    platt_rounds: int = 3  # Platt's rounds under noise (a fixed number: the plan counts them)


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD with Opacus; all three numbers must be set when enabled."""

    enabled: bool = False
    target_epsilon: float = 0.0
    delta: float = 0.0
    max_grad_norm: float = 0.0
    # per-sample gradients of VGG11 take ≈0.85 GiB per image: a Poisson batch runs in chunks of
    # this many (0 = the batch size; same update, less memory)
    max_physical_batch: int = 0
    secure_sums: SecureSumPrivacyConfig = field(default_factory=SecureSumPrivacyConfig)


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ parameters (Flower's legacy ``SecAggPlusWorkflow``)."""

    clipping_range: float = 8.0
    quantization_range: int = 2**26
    modulus_range: int = 2**32
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67


@dataclass(frozen=True)
class EvaluationConfig:
    """Metrics settings: histogram bins for secure AUC and the smallest class count a site may expose."""

    histogram_bins: int = 2000
    # under whole-study DP the released score histograms use this many bins instead: each bin carries
    # the evaluation phase's noise (SD ≈ z·√3 counts), so fine bins hold fewer cases than noise
    dp_histogram_bins: int = 8
    min_count: int = 5
    gradcam_examples: int = 4


@dataclass(frozen=True)
class Config:
    """The whole configuration of one study."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clinical: ClinicalConfig = field(default_factory=ClinicalConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for ``report.json`` and YAML round trips)."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        """Return a copy with dotted-key overrides applied, e.g. ``replace(**{"train.epochs": 2})``."""
        return apply_overrides(self, [f"{k}={_dump_scalar(v)}" for k, v in overrides.items()])


def _dump_scalar(value: Any) -> str:
    """``value`` as the YAML text an override parses back to it (a tuple as a flow list, no document end)."""
    text: str = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
    return text.strip().removesuffix("...").strip()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as a YAML scalar (``2`` → int, ``true`` → bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key, value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict."""
    config: Config = build_dataclass(Config, data)
    validate_config(config)
    return config


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return ``config`` with ``a.b=value`` overrides applied (validated like a file)."""
    tree = config.to_dict()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply overrides.

    Relative ``data.root``/``data.schema`` paths in a file stay as written (relative to the
    working directory), as a user typing them on the command line would expect.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, ConfigError, "pass a config file, e.g. configs/paper.yaml")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def validate_config(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    checks: list[tuple[bool, str]] = [
        (config.data.image_size >= 32, "data.image_size must be at least 32"),
        (0.0 < config.data.test_fraction < 1.0, "data.test_fraction must be in (0, 1)"),
        (config.data.margin >= 0, "data.margin must be >= 0"),
        (config.data.std > 0, "data.std must be > 0"),
        (config.data.max_image_pixels >= 1, "data.max_image_pixels must be >= 1"),
        (config.train.epochs >= 0, "train.epochs must be >= 0"),
        (config.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (config.train.lr > 0, "train.lr must be > 0"),
        (0.0 < config.train.val_fraction < 1.0, "train.val_fraction must be in (0, 1)"),
        (config.svm.C > 0, "svm.C must be > 0"),
        (0.05 <= config.fusion.holdout_fraction <= 0.5, "fusion.holdout_fraction must be in [0.05, 0.5]"),
        (config.fusion.combine == "concat" or config.fusion.fit_on == "holdout",
         "fusion.combine=stack needs fusion.fit_on=holdout: its weights are fitted on decision values of embeddings "
         "the backbone never trained on"),
        (config.fusion.combine == "concat" or config.federation.mode in ("pooled", "local"),
         "fusion.combine=stack runs in pooled and local studies only (a federated stack needs secure rounds of out-of-fold "
         "decision values, not built yet); use fusion.combine=concat in a federation"),
        (2 <= config.fusion.stack_folds <= 20, "fusion.stack_folds must be in [2, 20]"),
        (config.svm.ridge > 0, "svm.ridge must be > 0"),
        (config.svm.rff_features >= 1, "svm.rff_features must be >= 1"),
        (0.0 < config.svm.threshold < 1.0, "svm.threshold must be in (0, 1)"),
        (config.svm.embedding_pca >= 0, "svm.embedding_pca must be >= 0 (0 = keep all)"),
        (config.federation.rounds >= 0, "federation.rounds must be >= 0"),
        (config.federation.min_sites >= 1, "federation.min_sites must be >= 1"),
        (config.evaluation.histogram_bins >= 10, "evaluation.histogram_bins must be >= 10"),
        (config.evaluation.dp_histogram_bins >= 2, "evaluation.dp_histogram_bins must be >= 2"),
        (config.privacy.max_physical_batch >= 0, "privacy.max_physical_batch must be >= 0 (0 = the batch size)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    config.train.augment.check()
    _check_federation(config.federation)
    _check_dp_fusion(config.svm)
    if config.federation.mode == "federated" and config.train.keep != "last":
        raise ConfigError("train.keep=best_val picks a site's own best epoch; in a federation the global model "
                          "of the last round is kept: set train.keep=last")
    dp = config.privacy
    # DP with a BatchNorm backbone or with a strategy that cannot take DP-SGD (FedProx) is refused where
    # the registries are known: cldlr.server.strategies.check_study_config, run before anything trains.
    if dp.enabled:
        if config.train.keep != "last":
            raise ConfigError("train.keep=best_val selects an epoch on validation images outside the DP guarantee; "
                              "use train.keep=last with privacy.enabled")
        missing = [
            name
            for name, value in (("target_epsilon", dp.target_epsilon), ("delta", dp.delta), ("max_grad_norm", dp.max_grad_norm))
            if value <= 0
        ]
        if missing:
            raise ConfigError(
                "privacy.enabled is true but privacy." + ", privacy.".join(missing)
                + " is not set (> 0); a partial DP configuration is refused rather than run without DP"
            )
        if not dp.delta < 1:
            raise ConfigError("privacy.delta must be < 1 (typically below 1/number of training images)")
        sums = dp.secure_sums
        if sums.enabled:
            budgets = [sums.clinical, sums.encoder, sums.svm, sums.platt, sums.evaluation]
            if config.svm.dp_fusion and sums.platt == 0:  # it calibrates without a release of its own
                budgets.remove(sums.platt)
            if not all(math.isfinite(b) and b > 0 for b in budgets) or sums.platt_rounds < 2:
                raise ConfigError("privacy.secure_sums needs every phase budget (clinical, encoder, svm, platt, "
                                  "evaluation) finite and > 0 (platt may be 0 with svm.dp_fusion) and "
                                  "platt_rounds >= 2")
            if config.federation.mode == "evaluate":
                raise ConfigError("privacy.secure_sums is not available with federation.mode=evaluate yet (its "
                                  "calibration sums are outside the study's privacy plan); evaluate without it")
    elif dp.secure_sums.enabled:
        raise ConfigError("privacy.secure_sums.enabled needs privacy.enabled (one budget for the whole study: "
                          "the backbone's DP-SGD and the secure sums, at privacy.delta)")
    elif any(v > 0 for v in (dp.target_epsilon, dp.delta, dp.max_grad_norm)):
        raise ConfigError(
            "privacy settings are given but privacy.enabled is false; set privacy.enabled=true "
            "or remove them, so that nobody believes a non-DP run was private"
        )


def _check_dp_fusion(svm: SVMConfig) -> None:
    """``svm.dp_fusion`` is the linear, block-bounded rff fit: the settings it needs, or a ConfigError naming them."""
    if not svm.dp_fusion:
        return
    wrong = [text for bad, text in ((svm.solver != "rff", "svm.solver=rff"), (svm.kernel != "linear", "svm.kernel=linear"),
                                    (not svm.balance_blocks, "svm.balance_blocks=true"),
                                    (svm.embedding_pca < 1, "svm.embedding_pca >= 1 (e.g. 4)"))
             if bad]
    if wrong:
        raise ConfigError("svm.dp_fusion (the linear fusion on norm-bounded blocks) needs " + ", ".join(wrong)
                          + f"; got solver={svm.solver}, kernel={svm.kernel}, balance_blocks={svm.balance_blocks}, "
                          f"embedding_pca={svm.embedding_pca}")


_STRATEGY_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def _check_federation(fed: FederationConfig) -> None:
    """Strategy names are registry keys (lower-case words); server-optimizer settings in their ranges."""
    for where, name in [("federation.strategy", fed.strategy),
                        *((f"federation.compare_strategies[{i}]", n) for i, n in enumerate(fed.compare_strategies))]:
        if not _STRATEGY_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not a strategy name (lower-case, e.g. fedavg, fedprox, fedadam)")
    if len(set(fed.compare_strategies)) != len(fed.compare_strategies):
        raise ConfigError(f"federation.compare_strategies names a strategy twice: {list(fed.compare_strategies)}")
    if (fed.mode == "evaluate") != bool(fed.evaluate_bundle):
        raise ConfigError("federation.mode=evaluate and federation.evaluate_bundle=BUNDLE_FOLDER go together: an "
                          "evaluation-only study scores one bundle, and only that mode scores one")
    opt = fed.server_opt
    checks = [
        (opt.eta is None or opt.eta > 0, "federation.server_opt.eta must be > 0 (or null: Flower's default)"),
        (opt.tau is None or opt.tau > 0, "federation.server_opt.tau must be > 0 (or null: Flower's default)"),
        *((value is None or 0.0 <= value < 1.0, f"federation.server_opt.{name} must be in [0, 1) (or null: Flower's default)")
          for name, value in (("beta_1", opt.beta_1), ("beta_2", opt.beta_2))),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def dump_config(config: Config) -> str:
    """YAML text of the resolved config (written into every run folder)."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    text: str = yaml.safe_dump(plain(config.to_dict()), sort_keys=False)
    return text
