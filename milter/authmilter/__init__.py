"""authmilter: DKIM, SPF and DMARC in one milter, compatible with OpenDKIM/OpenDMARC configuration."""

from __future__ import annotations

__version__ = "0.1.0"
