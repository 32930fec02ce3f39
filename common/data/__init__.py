"""The site data contract and everything that reads a site: schema, validation, images, ROIs, splits, lesion descriptors."""
