"""The twistd plugin: C{twistd -n lineserver}; the work is in lineserver.tap."""

from twisted.application.service import ServiceMaker

lineserver = ServiceMaker(
    "lineserver",
    "lineserver.tap",
    "A supervised, flow-controlled line server (echo or sink).",
    "lineserver",
)
