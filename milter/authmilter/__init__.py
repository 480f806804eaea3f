"""authmilter: DKIM, SPF and DMARC in one milter, configured like OpenDKIM and OpenDMARC."""

from __future__ import annotations

__version__ = "0.1.0"
