"""Built-in flowkit parts, registered through the `flowkit` entry-point group."""
