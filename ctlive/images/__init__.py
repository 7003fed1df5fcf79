"""CRIU images and their diff.

``criu_format`` (the image files' format), ``pagediff`` (the C core: hashes, zero and
change detection, delta encode and decode), ``changes`` (the items of a change
stream), ``layout`` (matching old pages to new ones), ``manifest`` (what a dump
directory must contain), ``diff`` (dumps to change items), ``rebuild`` (change items
back to a dump, verified), ``files`` (whole files and file parts written with bounded
memory) and ``chain`` (pre-dump chains flattened through their PE_PARENT runs).
"""
