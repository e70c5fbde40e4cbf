"""The ops' contracts (schemas, argument and output tuples, fakes), one module per op family."""
