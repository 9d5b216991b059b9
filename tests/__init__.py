"""The test suite of gradlens (a package, so that its helper modules import as ``tests.x``)."""
