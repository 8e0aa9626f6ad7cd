"""Where sessions outlive their replica: the store interface (and its in-process
implementation), Redis, and the durability hooks that connect a SessionManager to a store.
"""
