"""Reference data from the MoECLIP paper (published numbers) and helpers to read them."""
