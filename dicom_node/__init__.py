"""OmniMRI Node: DICOM networking, durable storage, routing, jobs and dispatch."""

__version__ = "0.1.0"
