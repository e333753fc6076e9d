"""ChannelHub channels as an x402 v2 scheme (`channelhub`): the wire format here; the payer's and the payee's
plug-ins for the official `x402` package in `client` and `server`; the facilitator in settlement.api.facilitator."""
