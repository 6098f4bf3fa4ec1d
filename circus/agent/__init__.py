"""circus-agent: a build host that dials the gateway and builds what it is given.

Nothing here imports SQLAlchemy or psycopg2: an agent host needs no database driver.
"""
