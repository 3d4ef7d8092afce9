"""Local connections and the fan-out from the bus to them."""
