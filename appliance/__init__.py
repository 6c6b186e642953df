"""ct-appliance: a self-hosted receiver for CoinTracker cost-basis webhooks."""

__version__ = "0.1.0"
