"""Run the real ServerApp and ClientApp on Flower's simulation engine (Ray), one machine, N sites.

Flower 1.41's ``run_simulation`` (deprecated in favour of ``flwr run``, but the only in-process
entry point) passes no run config, so the resolved study config is written into the run folder
and named through ``$CLDLR_RUN``. Site folders are made absolute; partitioned virtual sites are
written out as real site folders first, exactly what hospitals would hold.

Every simulated site enforces a site policy as a deployed SuperNode does. The researcher holds
every site here, so :func:`simulation_policy` derives one from the study that lets it through —
as few parties as the study has sites, its rounds, its δ, no histogram cap, the study's
``data.cache_dir`` as the site's cache and ``<cache_dir>/state`` as its state folder (audit log,
release ledger, per-run state) — writes it to ``<run dir>/site-policy.yaml`` and names it in
``$CLDLR_SITE_POLICY`` (which :mod:`cldlr.client.node_policy` reads for simulated nodes only).
``run_federated_simulation(..., policy=FILE)`` enforces a policy file of one's own instead.
An evaluation-only study (``federation.mode: evaluate``) gives every simulated site the study's
bundle folder as its own copy (``evaluation_bundle``): the sites still verify it and its id.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from cldlr.client.node_policy import ENV_POLICY
from cldlr.client.policy import load_policy
from cldlr.common.bundle import LOCAL_SIGNER_CERT
from cldlr.common.config import Config, apply_overrides, dump_config
from cldlr.common.data.contract import CLINICAL_CSV, IMAGES_DIR, MASKS_DIR, SiteData
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_text, contained_path

log = logging.getLogger(__name__)


def materialize_sites(sites: list[SiteData], folder: Path) -> list[Path]:
    """Site folders for the simulated hospitals: real folders as they are, virtual ones written out."""
    paths = []
    for site in sites:
        if site.site_name and site.site_name != site.root.name:
            target = contained_path(folder, site.name)
            if not (target / CLINICAL_CSV).is_file():
                _write_site(site, target)
            paths.append(target.resolve())
        else:
            paths.append(site.root.resolve())
    return paths


def _write_site(site: SiteData, target: Path) -> None:
    from cldlr.common.data.contract import read_clinical_csv

    (target / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (target / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    frame = site.frame
    for column, sub in (("image_path", IMAGES_DIR), ("mask_path", MASKS_DIR)):
        for path in frame[column]:
            shutil.copy2(path, contained_path(target / sub, Path(path).name))
    rows = []
    for root in sorted({Path(p).parent.parent for p in frame["image_path"]}):
        raw = read_clinical_csv(root)
        rows.append(raw[raw["image_id"].isin(set(frame["image_id"]))])
    import pandas as pd

    atomic_write_text(target / CLINICAL_CSV, pd.concat(rows).to_csv(index=False))


def simulation_config(config: Config, site_paths: list[Path], run_dir: Path) -> Path:
    """The resolved config the ServerApp reads: absolute paths, the sites, their number."""
    resolved = apply_overrides(config, [
        f"federation.sites=[{', '.join(json.dumps(str(p)) for p in site_paths)}]",
        f"federation.num_sites={len(site_paths)}", "federation.partition=folders",
        f"federation.mode={'evaluate' if config.federation.mode == 'evaluate' else 'federated'}",
        f"federation.evaluate_bundle={json.dumps(_absolute(config.federation.evaluate_bundle))}",
        f"federation.evaluate_trust=[{', '.join(json.dumps(p) for p in evaluation_trust(config))}]",
        f"data.cache_dir={json.dumps(str(Path(config.data.cache_dir).resolve()))}",
        f"data.schema={json.dumps(str(Path(config.data.schema).resolve()) if config.data.schema else '')}",
        f"data.root={json.dumps(str(Path(config.data.root).resolve()) if config.data.root else '')}",
    ])
    path = run_dir / "config.resolved.yaml"
    atomic_write_text(path, dump_config(resolved))
    return path


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def evaluation_trust(config: Config) -> list[str]:
    """What simulated sites trust to sign the evaluated bundle: ``federation.evaluate_trust``, else its study's signer.

    A study bundle is signed by a study-local key whose certificate lies beside it
    (``<run>/model-signer.pem``); a bundle with neither is scored by no site.
    """
    files = [_absolute(p) for p in config.federation.evaluate_trust]
    local = Path(_absolute(config.federation.evaluate_bundle)).parent / LOCAL_SIGNER_CERT
    return files or ([str(local)] if config.federation.evaluate_bundle and local.is_file() else [])


#: The researcher holds every simulated site: histograms as fine as the protocol asks, and a lifetime ε cap
#: that never binds (a deployed site sets its own: configs/policy/site.yaml).
SIMULATION_MAX_BINS = 2**31 - 1
SIMULATION_EPSILON_CAP = 1e9
DEFAULT_DELTA = 1e-5


def simulation_policy(config: Config) -> dict[str, Any]:
    """A site policy under which the study runs as configured (its sites, rounds, δ, folders)."""
    fed, privacy = config.federation, config.privacy
    cache = Path(config.data.cache_dir).expanduser().resolve()
    return {
        "min_parties": max(2, min(fed.min_sites, fed.num_sites)),
        "allow_single_site": fed.num_sites == 1,
        "min_class_count": 1,
        "max_histogram_bins": SIMULATION_MAX_BINS,
        "finest_bin_sd": 0.0,
        "max_rounds": max(1, fed.rounds),
        "share_training_metrics": True,
        # leave-one-site-out's site-by-site matrix needs the sites' own metrics: the researcher holds them all
        "share_local_metrics": fed.compare_loso,
        "schema": str(Path(config.data.schema).expanduser().resolve()),
        "evaluation_bundle": _absolute(config.federation.evaluate_bundle),  # the same copy as the centre's
        **({"trusted_bundle_signers": evaluation_trust(config)} if config.federation.mode == "evaluate" else {}),
        "dp": {"required": False, "epsilon_cap": SIMULATION_EPSILON_CAP,
               "delta": privacy.delta if privacy.enabled and 0 < privacy.delta < 1 else DEFAULT_DELTA},
        "folders": {"state": str(cache / "state"), "cache": str(cache)},
    }


def write_simulation_policy(config: Config, run_dir: Path, policy: Path | None = None) -> Path:
    """The policy file every simulated site enforces: ``policy`` (checked), or one derived from the study."""
    if policy is not None:
        load_policy(policy)  # a broken file fails here, not in every Ray actor
        return Path(policy).expanduser().resolve()
    path = run_dir / "site-policy.yaml"
    atomic_write_text(path, "# derived from the study by cldlr.simulations.federated (every site is the researcher's)\n"
                      + yaml.safe_dump(simulation_policy(config), sort_keys=False))
    load_policy(path)
    return path.resolve()


def ray_backend_config(config: Config, num_sites: int) -> dict:
    """Flower's Ray backend settings: this machine by default, or an existing cluster.

    On one machine each virtual site gets ``federation.client_cpus`` (all cores under DP-SGD,
    whose per-sample gradients take ≈16 GiB for VGG11 at batch 16: one site at a time). With
    ``federation.ray_address`` Ray joins that cluster, which owns its resources (``ray.init``
    refuses ``num_cpus`` then); ``client_cpus``/``client_gpus`` size each site's actor there.
    """
    fed = config.federation
    resources = {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus}
    if fed.ray_address:
        return {"client_resources": resources, "init_args": {"address": fed.ray_address}}
    cpus = max(1, min(num_sites, os.cpu_count() or 1))
    if config.privacy.enabled:
        resources["num_cpus"] = cpus
    return {"client_resources": resources, "init_args": {"num_cpus": cpus}}


def run_federated_simulation(sites: list[SiteData], config: Config, run_dir: Path, *, resume: bool = False,
                             policy: Path | None = None) -> Path:
    """Start Flower's simulation engine with one virtual SuperNode per site and wait for the report.

    Every site enforces ``policy`` (a site policy file), by default one derived from the study.
    """
    from flwr.simulation import run_simulation

    from cldlr.client.app import app as client_app
    from cldlr.server.app import ENV_KEY
    from cldlr.server.app import app as server_app

    if not config.data.schema:
        from cldlr.common.data.schema import resolve_schema

        schema = resolve_schema(config)
        config = apply_overrides(config, [f"data.schema={json.dumps(schema.source)}"])
    paths = materialize_sites(sites, run_dir / "sites")
    config_path = simulation_config(config, paths, run_dir)
    os.environ[ENV_KEY] = json.dumps({"config": str(config_path), "run-dir": str(run_dir.resolve()), "resume": resume})
    resolved = apply_overrides(config, [f"federation.num_sites={len(paths)}"])
    os.environ[ENV_POLICY] = str(write_simulation_policy(resolved, run_dir, policy))  # Ray's workers inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per virtual site: they share the machine's cores
    log.info("simulating %d sites with Flower's Ray engine", len(paths))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(paths),
                   backend_config=ray_backend_config(config, len(paths)))
    expected = "pretrain.json" if config.federation.phases == "backbone" else "report.json"
    if not (run_dir / expected).is_file():
        raise CldlrError(f"the federated simulation ended without {expected} in {run_dir}; see the log above")
    return run_dir
