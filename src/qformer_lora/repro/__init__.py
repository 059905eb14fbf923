"""The reproduction harness: probes of the installed releases, pinned expectations, `reproduce`."""
