"""From a complete series to model outputs: volumes, model packages, engines, the OmniMRI family.

This package never opens a socket and never imports ``dicom_node``.
"""
