"""Finding the sites of a simulation: site folders, a folder of sites, or one dataset partitioned."""

from __future__ import annotations

import logging

import pandas as pd

from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData, site_folders
from cldlr.common.data.schema import resolve_schema
from cldlr.common.data.site import read_site
from cldlr.common.data.splits import partition, site_table, with_split

log = logging.getLogger(__name__)


def load_sites(config: Config) -> list[SiteData]:
    """Read and validate every site, then split each one (patient-level, stratified, seeded).

    With ``federation.partition`` other than ``folders``, the single dataset is cut into
    patient-disjoint virtual sites first. Splitting inside each site keeps the test sets the
    same whichever mode (pooled, local, federated) then uses them.
    """
    schema = resolve_schema(config)
    folders = site_folders(config)
    sites = [read_site(folder, schema, max_image_pixels=config.data.max_image_pixels) for folder in folders]
    fed = config.federation
    if fed.partition != "folders":
        merged = merge_sites(sites)
        assignment = partition(merged.frame, by=fed.partition, column=fed.partition_column,
                               num_sites=fed.num_sites, alpha=fed.dirichlet_alpha, seed=config.run.seed)
        frame = merged.frame.assign(site=assignment.to_numpy())
        log.info("partitioned into virtual sites:\n%s", site_table(frame, "site"))
        sites = [merged.subset(frame["site"] == name).renamed(str(name)) for name in sorted(frame["site"].unique())]
    data = config.data
    return [with_split(s, test_fraction=data.test_fraction, seed=data.split_seed, use_existing=data.use_existing_split)
            for s in sites]


def merge_sites(sites: list[SiteData], name: str = "pooled") -> SiteData:
    """One table of all sites' rows (paths stay absolute per row); a ``site`` column remembers the origin."""
    if len(sites) == 1:
        single = sites[0]
        return SiteData(single.root, single.schema, single.frame.assign(site=single.name), single.name)
    frames = [s.frame.assign(site=s.name) for s in sites]
    return SiteData(sites[0].root.parent, sites[0].schema, pd.concat(frames, ignore_index=True), name)
