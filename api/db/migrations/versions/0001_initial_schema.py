"""initial schema

Revision ID: 0001
Revises: 
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_stats',
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('ewma_seconds', sa.Double(), nullable=False),
    sa.Column('ewma_interval', sa.Double(), nullable=False),
    sa.Column('last_finished', sa.Double(), nullable=False),
    sa.Column('completed', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('model')
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=100), nullable=False),
    sa.Column('api_key_hash', sa.String(length=64), nullable=False),
    sa.Column('kudos', sa.Double(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('api_key_hash')
    )
    # The anonymous user (API key 0000000000) exists from the start. Its hash column holds a
    # marker no SHA-256 hex digest can equal; auth recognises the anonymous key itself.
    users = sa.table('users', sa.column('id', sa.Integer), sa.column('username', sa.String),
                     sa.column('api_key_hash', sa.String), sa.column('kudos', sa.Double),
                     sa.column('created_at', sa.Double))
    op.bulk_insert(users, [{'id': 0, 'username': 'Anonymous', 'api_key_hash': 'anonymous',
                            'kudos': 0.0, 'created_at': 0.0}])
    op.create_table('requests',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('negative_prompt', sa.Text(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('models', sa.JSON(), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('r2', sa.Boolean(), nullable=False),
    sa.Column('nsfw', sa.Boolean(), nullable=False),
    sa.Column('censor_nsfw', sa.Boolean(), nullable=False),
    sa.Column('shared', sa.Boolean(), nullable=False),
    sa.Column('kudos', sa.Double(), nullable=False),
    sa.Column('cancelled', sa.Boolean(), nullable=False),
    sa.Column('client_agent', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_requests_user_id'), ['user_id'], unique=False)

    op.create_table('workers',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('models', sa.JSON(), nullable=False),
    sa.Column('last_seen', sa.Double(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('generations',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claim_id', sa.String(length=36), nullable=True),
    sa.Column('claimed_by', sa.String(length=36), nullable=True),
    sa.Column('deadline', sa.Double(), nullable=True),
    sa.Column('started_at', sa.Double(), nullable=True),
    sa.Column('finished_at', sa.Double(), nullable=True),
    sa.Column('storage_key', sa.String(length=300), nullable=True),
    sa.Column('worker_id', sa.String(length=36), nullable=True),
    sa.Column('worker_name', sa.String(length=100), nullable=True),
    sa.Column('censored', sa.Boolean(), nullable=False),
    sa.Column('gen_metadata', sa.JSON(), nullable=False),
    sa.Column('fault_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['request_id'], ['requests.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_generations_request_id'), ['request_id'], unique=False)
        batch_op.create_index('ix_generations_state_deadline', ['state', 'deadline'], unique=False)

    op.create_table('queue_entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('generation_id', sa.String(length=36), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('sort_key', sa.Double(), nullable=False),
    sa.Column('pixels', sa.BigInteger(), nullable=False),
    sa.Column('megapixelsteps', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['generation_id'], ['generations.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('queue_entries', schema=None) as batch_op:
        batch_op.create_index('ix_queue_claim', ['model', 'sort_key', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_queue_entries_generation_id'), ['generation_id'], unique=False)
        batch_op.create_index('ix_queue_sort', ['sort_key', 'id'], unique=False)



def downgrade() -> None:
    # ### commands auto generated by Alembic - please adjust! ###
    with op.batch_alter_table('queue_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_sort')
        batch_op.drop_index(batch_op.f('ix_queue_entries_generation_id'))
        batch_op.drop_index('ix_queue_claim')

    op.drop_table('queue_entries')
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.drop_index('ix_generations_state_deadline')
        batch_op.drop_index(batch_op.f('ix_generations_request_id'))

    op.drop_table('generations')
    op.drop_table('workers')
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_requests_user_id'))

    op.drop_table('requests')
    op.drop_table('users')
    op.drop_table('model_stats')
