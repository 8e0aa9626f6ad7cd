"""HTTP routes: thin handlers that validate, hand work to the core, and encode the answer."""
