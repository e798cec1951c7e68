"""Pure functions that turn inference ``Results`` and the source series into DICOM datasets."""
