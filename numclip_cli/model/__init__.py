"""The ordinal models: prompt encoder, heads, and the methods that combine them."""
