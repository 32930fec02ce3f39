"""``cldlr simulate``: run a study in pooled, local or federated mode on one machine."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cldlr.common.bundle import BundleSigner, export_study_bundle, signature_section, study_signer
from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData
from cldlr.common.data.descriptors import known_spacings
from cldlr.common.errors import ConfigError
from cldlr.common.evaluation.report import table2_markdown, write_report
from cldlr.common.logs import configure_logging
from cldlr.common.runs import new_run_dir
from cldlr.server.strategies import check_study_config
from cldlr.simulations.sites import load_sites, merge_sites
from cldlr.simulations.study import run_study

log = logging.getLogger(__name__)


def _run_dir(config: Config, resume: Path | None) -> Path:
    if resume is None:
        return new_run_dir(config)
    if not resume.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such run folder")
    return resume


def simulate(config: Config, *, compare: bool = False, resume: Path | None = None, repeats: int = 1) -> Path:
    """Run the configured study and return its run folder (holding ``report.md``/``report.json``).

    With ``repeats`` > 1 the study (or comparison) runs over that many patient-level splits
    (:mod:`cldlr.simulations.repeats`), each in its own sub-folder.
    """
    configure_logging(config.run.log_level)
    check_study_config(config)  # names and DP compatibility, before any site is read or anything trains
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: give 1 (one split) or more")
    sites = load_sites(config)  # an invalid site stops here, before a run folder exists
    run_dir = _run_dir(config, resume)
    logging.getLogger("cldlr").info("run folder: %s", run_dir)
    if repeats != 1:
        from cldlr.simulations.repeats import run_repeats

        def one(cfg: Config, folder: Path, again: bool) -> Path:  # each repeat has its own split
            return _simulate_into(cfg, load_sites(cfg), folder, compare=compare, resume=again)

        return run_repeats(config, run_dir, repeats, one, compare=compare, resume=resume is not None)
    return _simulate_into(config, sites, run_dir, compare=compare, resume=resume is not None)


def _simulate_into(config: Config, sites: list[SiteData], run_dir: Path, *, compare: bool, resume: bool) -> Path:
    """One study (or comparison) of ``sites`` into an existing ``run_dir``."""
    mode = config.federation.mode
    if compare:
        from cldlr.simulations.compare import run_comparison

        return run_comparison(sites, config, run_dir, resume=resume)
    if mode == "pooled":
        site = merge_sites(sites)
        outcome, artifacts = run_study(site, config, run_dir, resume=resume)
        signer = study_signer(config, run_dir)
        export_study_bundle(run_dir / "model", outcome, artifacts, config, site.schema, known_spacings(site.frame),
                            signer=signer)
        title = "CLDLR study — single site" if len(sites) == 1 else f"CLDLR study — pooled ({len(sites)} sites)"
        outcome = dataclasses.replace(outcome, sections={**outcome.sections, **signature_section(signer, run_dir)})
        return write_report(run_dir, outcome, config, title=title)
    if mode == "local":
        return _run_local(sites, config, run_dir, resume, study_signer(config, run_dir))
    from cldlr.simulations.federated import run_federated_simulation

    return run_federated_simulation(sites, config, run_dir, resume=resume)


def _run_local(sites: list, config: Config, run_dir: Path, resume: bool, signer: BundleSigner) -> Path:
    """Each site trains alone; one sub-report per site and a summary table; ``signer`` signs every site's bundle."""
    sections = {}
    first = None
    for site in sites:
        site_dir = run_dir / f"local-{site.name}"
        site_dir.mkdir(exist_ok=True)
        outcome, artifacts = run_study(site, config, site_dir, resume=resume)
        export_study_bundle(site_dir / "model", outcome, artifacts, config, site.schema, known_spacings(site.frame),
                            signer=signer)
        note = signature_section(signer, run_dir)
        write_report(site_dir, dataclasses.replace(outcome, sections={**outcome.sections, **note}), config,
                     title=f"CLDLR study — local training at {site.name}")
        sections[f"Local — {site.name}"] = table2_markdown(outcome.metrics)
        first = first or outcome
    assert first is not None
    title = f"CLDLR study — local training ({len(sites)} sites; main tables: {sites[0].name})"
    sections |= signature_section(signer, run_dir)
    return write_report(run_dir, dataclasses.replace(first, sections={**first.sections, **sections}), config, title=title)
