// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {IChannelHub} from "./IChannelHub.sol";

/// @title ChannelHub
/// @notice Unidirectional payment channels (ETH or ERC-20) whose off-chain vouchers are settled in batches.
/// @dev A voucher is `(channelId, cumulativeAmount)` signed by the payer with EIP-712. Settlement credits the payee's
/// balance inside the hub with the increment since the last settlement; payees withdraw when they like, or spend the
/// balance on channels of their own (`openFromBalance`, `topUpFromBalance`) without leaving the hub.
///
/// Gas design: everything `settleBatch` touches per channel lives in ONE storage slot (`_state`), and the channel's
/// parties are not read at all. `settleBatch` takes a packed byte string parsed in assembly (no ABI decoding of
/// nested arrays): groups of entries that share a payee and a token, each entry naming its channel by (payer, salt).
/// The hub recomputes the id `keccak256(abi.encode(payer, payee, token, salt))`; a channel with that id exists only if
/// it was opened with exactly those parties, and the voucher counts only if its signer is that payer. The payee's
/// balance is then written once per group instead of once per entry.
///
/// Every state-changing function is `nonReentrant` (transient-storage guard, ~200 gas a call), so no callback of a
/// token can observe or change a half-done operation.
///
/// Invariant, per asset: hub balance == sum of credited balances + sum of (deposit - settled) over channels that are
/// not closed.
///
/// Types, events, errors and the documentation of every parameter are in `IChannelHub`, which also states the token
/// behaviours the hub does not support (rebasing, blocklists, pausing, re-entering hooks).
contract ChannelHub is IChannelHub, EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    // ------------------------------------------------------------------------------------------------------------
    // Types
    // ------------------------------------------------------------------------------------------------------------

    /// @dev The whole settle-time state of a channel, packed in one slot (104 + 104 + 40 + 8 = 256 bits).
    struct ChannelState {
        uint104 deposit;
        uint104 settled;
        uint40 closeDeadline;
        Status status;
    }

    /// @dev Who is in a channel; read by the open/close paths only, never by settlement.
    struct Parties {
        address payer;
        address payee;
        address token;
    }

    // ------------------------------------------------------------------------------------------------------------
    // Constants and storage
    // ------------------------------------------------------------------------------------------------------------

    /// @notice EIP-712 type hash of a voucher.
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint256 cumulativeAmount)");

    /// @notice The shortest challenge period a hub can be deployed with, in seconds.
    uint256 public constant MIN_CHALLENGE_PERIOD = 60;

    /// @notice The largest deposit a channel can hold, in base units (2^104 - 1, about 2.0e31).
    uint256 public constant MAX_DEPOSIT = type(uint104).max;

    /// @notice Bytes of a group header in `settleBatch`: payee (20) | token (20) | entry count (2).
    uint256 public constant GROUP_HEADER_BYTES = 42;

    /// @notice Bytes of an entry in `settleBatch`: payer (20) | salt (32) | cumulativeAmount (13) | r (32) | vs (32).
    uint256 public constant ENTRY_BYTES = 129;

    /// @notice Bytes of one channel's record in `ChannelsSettled.settlements`: channelId (32) | cumulativeAmount (13).
    uint256 public constant SETTLED_RECORD_BYTES = 45;

    /// @notice Seconds between `requestClose` and the moment the payer may finalize.
    uint256 public immutable challengePeriod;

    mapping(bytes32 channelId => ChannelState) private _state;
    mapping(bytes32 channelId => Parties) private _parties;
    mapping(address account => mapping(address token => uint256)) private _balances;

    // ------------------------------------------------------------------------------------------------------------
    // Construction
    // ------------------------------------------------------------------------------------------------------------

    /// @param challengePeriod_ Seconds a payer must wait between `requestClose` and `finalizeClose`.
    constructor(uint256 challengePeriod_) EIP712("ChannelHub", "1") {
        if (challengePeriod_ < MIN_CHALLENGE_PERIOD || challengePeriod_ > type(uint32).max) {
            revert ChannelHubInvalidChallengePeriod(challengePeriod_);
        }
        challengePeriod = challengePeriod_;
    }

    // ------------------------------------------------------------------------------------------------------------
    // Opening and funding
    // ------------------------------------------------------------------------------------------------------------

    /// @inheritdoc IChannelHub
    /// @dev For ETH, `msg.value` must equal `amount`. For fee-on-transfer tokens the deposit is what arrived.
    function open(address payee, address token, bytes32 salt, uint256 amount)
        external
        payable
        nonReentrant
        returns (bytes32 channelId)
    {
        channelId = _create(payee, token, salt);
        _open(channelId, payee, token, salt, _pull(token, amount));
    }

    /// @inheritdoc IChannelHub
    function openFromBalance(address payee, address token, bytes32 salt, uint256 amount)
        external
        nonReentrant
        returns (bytes32 channelId)
    {
        channelId = _create(payee, token, salt);
        _debit(msg.sender, token, amount);
        _open(channelId, payee, token, salt, amount);
    }

    /// @inheritdoc IChannelHub
    function topUp(bytes32 channelId, uint256 amount) external payable nonReentrant {
        address token = _requireOpen(channelId).token;
        _addDeposit(channelId, _pull(token, amount));
    }

    /// @inheritdoc IChannelHub
    function topUpFromBalance(bytes32 channelId, uint256 amount) external nonReentrant {
        address token = _requireOpen(channelId).token;
        _debit(msg.sender, token, amount);
        _addDeposit(channelId, amount);
    }

    // ------------------------------------------------------------------------------------------------------------
    // Settlement
    // ------------------------------------------------------------------------------------------------------------

    /// @inheritdoc IChannelHub
    /// @dev `batch` is a sequence of groups, each `payee (20 bytes) | token (20) | count (2, big-endian, > 0)` followed
    /// by `count` entries of `payer (20) | salt (32) | cumulativeAmount (13, big-endian) | r (32) | vs (32)`, the
    /// signature in EIP-2098 compact form (`vs` = s with the parity of v in its top bit). Data that is cut short
    /// reverts with `ChannelHubMalformedBatch`. Skip-not-revert: a bad entry emits `VoucherSkipped` and the rest of the
    /// batch settles, so re-sending a batch is harmless. Each group's payee is credited once with the sum of its
    /// increments.
    function settleBatch(bytes calldata batch) external nonReentrant {
        // Scratch memory for the per-entry hashes and the ecrecover call, allocated once; the parts that do not
        // change per entry (type hash, EIP-712 prefix and domain separator, a group's payee and token) are written
        // once, not per entry:
        //   w + 0x000  channel id preimage:  payer | payee | token | salt
        //   w + 0x080  struct hash preimage: VOUCHER_TYPEHASH | channelId | cumulativeAmount
        //   w + 0x0e0  digest preimage:      0x1901 | domain separator | struct hash   (0x42 bytes)
        //   w + 0x140  ecrecover input:      digest | v | r | s
        bytes32 typeHash = VOUCHER_TYPEHASH;
        bytes32 domain = _domainSeparatorV4();
        uint256 w;
        assembly ("memory-safe") {
            w := mload(0x40)
            mstore(0x40, add(w, 0x1c0))
            mstore(add(w, 0x80), typeHash)
            mstore(add(w, 0xe0), hex"1901")
            mstore(add(w, 0xe2), domain)
        }
        uint256 start;
        assembly ("memory-safe") {
            start := batch.offset
        }
        uint256 end = start + batch.length;
        uint256 p = start;
        while (p < end) {
            address payee;
            address token;
            uint256 count;
            assembly ("memory-safe") {
                payee := shr(96, calldataload(p))
                token := shr(96, calldataload(add(p, 20)))
                count := shr(240, calldataload(add(p, 40)))
            }
            // count < 2^16, so the product cannot overflow; `end - p` cannot wrap since p < end.
            if (end - p < GROUP_HEADER_BYTES || count == 0 || end - p - GROUP_HEADER_BYTES < count * ENTRY_BYTES) {
                revert ChannelHubMalformedBatch(p - start);
            }
            assembly ("memory-safe") {
                mstore(add(w, 0x20), payee)
                mstore(add(w, 0x40), token)
            }
            uint256 credit;
            uint256 log;
            uint256 q;
            (p, credit, log, q) = _settleGroup(w, p + GROUP_HEADER_BYTES, count);
            if (credit != 0) {
                _balances[payee][token] += credit;
                bytes32 topic = ChannelsSettled.selector;
                assembly ("memory-safe") {
                    let length := sub(q, add(log, 0x60))
                    mstore(q, 0) // zero padding up to the next word
                    mstore(log, credit)
                    mstore(add(log, 0x20), 0x40)
                    mstore(add(log, 0x40), length)
                    log3(log, add(0x60, and(add(length, 31), not(31))), topic, payee, token)
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Closing
    // ------------------------------------------------------------------------------------------------------------

    /// @inheritdoc IChannelHub
    function requestClose(bytes32 channelId) external nonReentrant {
        Parties storage parties = _requireOpen(channelId);
        if (msg.sender != parties.payer) revert ChannelHubNotPayer(channelId, msg.sender);
        uint256 deadline = block.timestamp + challengePeriod;
        ChannelState storage state = _state[channelId];
        state.status = Status.Closing;
        state.closeDeadline = uint40(deadline);
        emit CloseRequested(channelId, deadline);
    }

    /// @inheritdoc IChannelHub
    /// @dev Anyone may call it; the refund only ever goes to the payer.
    function finalizeClose(bytes32 channelId) external nonReentrant {
        ChannelState memory state = _state[channelId];
        if (state.status != Status.Closing) {
            if (state.status == Status.None) revert ChannelHubUnknownChannel(channelId);
            if (state.status == Status.Closed) revert ChannelHubChannelClosed(channelId);
            revert ChannelHubChannelNotClosing(channelId);
        }
        if (block.timestamp <= state.closeDeadline) {
            revert ChannelHubChallengeNotOver(channelId, state.closeDeadline);
        }
        _close(channelId, state);
    }

    /// @inheritdoc IChannelHub
    /// @dev Pass an empty `signature` to close without settling. The remainder is credited to the payer's balance.
    function closeByPayee(bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature)
        external
        nonReentrant
    {
        Parties storage parties = _parties[channelId];
        ChannelState memory state = _state[channelId];
        if (state.status == Status.None) revert ChannelHubUnknownChannel(channelId);
        if (state.status == Status.Closed) revert ChannelHubChannelClosed(channelId);
        if (msg.sender != parties.payee) revert ChannelHubNotPayee(channelId, msg.sender);
        if (signature.length != 0 && cumulativeAmount > state.settled) {
            if (state.status == Status.Closing && block.timestamp > state.closeDeadline) {
                revert ChannelHubChallengeExpired(channelId, state.closeDeadline);
            }
            if (cumulativeAmount > state.deposit) {
                revert ChannelHubExceedsDeposit(channelId, cumulativeAmount, state.deposit);
            }
            (address signer, ECDSA.RecoverError err,) =
                ECDSA.tryRecoverCalldata(hashVoucher(channelId, cumulativeAmount), signature);
            if (err != ECDSA.RecoverError.NoError || signer != parties.payer) {
                revert ChannelHubInvalidSignature(channelId);
            }
            // Bounded by the deposit check above, so the cast and the subtraction are exact.
            uint256 increment = cumulativeAmount - state.settled;
            state.settled = uint104(cumulativeAmount);
            _state[channelId].settled = state.settled;
            _balances[msg.sender][parties.token] += increment;
            emit ChannelsSettled(
                msg.sender, parties.token, increment, abi.encodePacked(channelId, uint104(cumulativeAmount))
            );
        }
        _close(channelId, state);
    }

    // ------------------------------------------------------------------------------------------------------------
    // Balances
    // ------------------------------------------------------------------------------------------------------------

    /// @inheritdoc IChannelHub
    function withdraw(address token, uint256 amount, address to) external nonReentrant {
        if (to == address(0)) revert ChannelHubInvalidRecipient();
        if (amount == 0) revert ChannelHubZeroAmount();
        _debit(msg.sender, token, amount);
        emit Withdrawn(msg.sender, token, to, amount);
        if (token == address(0)) {
            (bool ok,) = to.call{value: amount}("");
            if (!ok) revert ChannelHubEthTransferFailed(to, amount);
        } else {
            IERC20(token).safeTransfer(to, amount);
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------------------------------------------------

    /// @inheritdoc IChannelHub
    function balanceOf(address account, address token) external view returns (uint256) {
        return _balances[account][token];
    }

    /// @inheritdoc IChannelHub
    function channel(bytes32 channelId) external view returns (ChannelView memory) {
        ChannelState memory state = _state[channelId];
        Parties memory parties = _parties[channelId];
        return ChannelView({
            payer: parties.payer,
            payee: parties.payee,
            token: parties.token,
            deposit: state.deposit,
            settled: state.settled,
            closeDeadline: state.closeDeadline,
            status: state.status
        });
    }

    /// @inheritdoc IChannelHub
    function channelIdOf(address payer, address payee, address token, bytes32 salt) external pure returns (bytes32) {
        return _channelId(payer, payee, token, salt);
    }

    /// @inheritdoc IChannelHub
    function hashVoucher(bytes32 channelId, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)));
    }

    /// @inheritdoc IChannelHub
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ------------------------------------------------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------------------------------------------------

    /// @dev Settles the `count` entries of one group starting at calldata offset `p` (the group's payee and token
    /// are already in the scratch memory at `w`) and returns the offset after them, the group's credit and its
    /// ChannelsSettled data so far: built in place at `log`, ABI-encoded as credited | 0x40 | length | records, each
    /// record `channelId (32) | cumulativeAmount (13)`, with records written up to `q`. A function of its own so
    /// that the loop's variables fit on the stack.
    function _settleGroup(uint256 w, uint256 p, uint256 count)
        private
        returns (uint256 next, uint256 credit, uint256 log, uint256 q)
    {
        bytes32 skipped = VoucherSkipped.selector;
        assembly ("memory-safe") {
            // Room for every record plus a word of padding.
            log := mload(0x40)
            q := add(log, 0x60)
            mstore(0x40, add(q, add(mul(count, SETTLED_RECORD_BYTES), 0x20)))
            let mask := 0xffffffffffffffffffffffffff // 104 bits: deposit and settled
            mstore(0x20, _state.slot) // stays there: nothing else in the loop writes 0x20
            for {} count { count := sub(count, 1) p := add(p, ENTRY_BYTES) } {
                let payer := shr(96, calldataload(p))
                let amount := shr(152, calldataload(add(p, 52)))
                // channelId = keccak256(abi.encode(payer, payee, token, salt)): a channel with this id exists
                // only if it was opened by `payer` to this group's payee in this group's token.
                mstore(w, payer)
                mstore(add(w, 0x60), calldataload(add(p, 20)))
                let channelId := keccak256(w, 0x80)
                mstore(0x00, channelId)
                let slot := keccak256(0x00, 0x40) // _state[channelId]: 0x20 holds _state.slot
                // ChannelState: deposit [0, 104), settled [104, 208), closeDeadline [208, 248), status [248, 256)
                let packed := sload(slot)
                let settled := and(shr(104, packed), mask)
                // SkipReason: 1 unknown, 2 closed, 3 challenge expired, 4 not above settled, 5 exceeds deposit,
                // 6 invalid signature. Cheap checks first, so that a skipped entry costs little.
                // settled <= deposit, so at most one of the amount reasons holds; the status ones come first.
                let reason := or(mul(4, iszero(gt(amount, settled))), mul(5, gt(amount, and(packed, mask))))
                if iszero(eq(shr(248, packed), 1)) {
                    switch shr(248, packed)
                    case 0 { reason := 1 }
                    case 3 { reason := 2 }
                    default { if gt(timestamp(), and(shr(208, packed), 0xffffffffff)) { reason := 3 } }
                }
                if iszero(reason) {
                    reason := 6
                    // The checks of OpenZeppelin's ECDSA.tryRecover(digest, r, vs), inlined: v = 27 + the top
                    // bit of vs, s = the rest; s above n/2 (the malleable twin) fails. The precompile writes
                    // nothing for a signature it cannot recover, hence the zeroed output word; a recovery to
                    // address(0) then fails the comparison with the payer, which is never address(0) here (the
                    // channel exists, and only a sender, never address(0), opens one).
                    let vs := calldataload(add(p, 97))
                    let sValue := shr(1, shl(1, vs))
                    if iszero(gt(sValue, 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0)) {
                        mstore(add(w, 0xa0), channelId)
                        mstore(add(w, 0xc0), amount)
                        mstore(add(w, 0x102), keccak256(add(w, 0x80), 0x60))
                        mstore(add(w, 0x140), keccak256(add(w, 0xe0), 0x42))
                        mstore(add(w, 0x160), add(shr(255, vs), 27))
                        mstore(add(w, 0x180), calldataload(add(p, 65)))
                        mstore(add(w, 0x1a0), sValue)
                        mstore(0x00, 0)
                        if iszero(staticcall(gas(), 0x01, add(w, 0x140), 0x80, 0x00, 0x20)) { revert(0, 0) }
                        let signer := mload(0x00)
                        if eq(signer, payer) {
                            reason := 0
                            // settled < amount <= deposit <= MAX_DEPOSIT: the subtraction cannot wrap, the
                            // amount fits the 104 bits of `settled` (so replacing that field keeps the others)
                            // and a group's credit cannot wrap. The record's second word spills 19 zero bytes
                            // into the next record, which that record overwrites.
                            credit := add(credit, sub(amount, settled))
                            sstore(slot, or(and(packed, not(shl(104, mask))), shl(104, amount)))
                            mstore(q, channelId)
                            mstore(add(q, 0x20), shl(152, amount))
                            q := add(q, SETTLED_RECORD_BYTES)
                        }
                    }
                }
                if reason {
                    // emit VoucherSkipped(channelId, reason)
                    mstore(0x00, reason)
                    log2(0x00, 0x20, skipped, channelId)
                }
            }
            next := p
        }
    }

    /// @dev `channelIdOf` without allocating memory.
    function _channelId(address payer, address payee, address token, bytes32 salt) private pure returns (bytes32 id) {
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, and(payer, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(ptr, 0x20), and(payee, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(ptr, 0x40), and(token, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(ptr, 0x60), salt)
            id := keccak256(ptr, 0x80)
        }
    }

    /// @dev Checks a new channel's parameters and returns its id.
    function _create(address payee, address token, bytes32 salt) private view returns (bytes32 channelId) {
        if (payee == address(0) || payee == msg.sender) revert ChannelHubInvalidPayee(payee);
        channelId = _channelId(msg.sender, payee, token, salt);
        if (_state[channelId].status != Status.None) revert ChannelHubChannelExists(channelId);
    }

    function _open(bytes32 channelId, address payee, address token, bytes32 salt, uint256 amount) private {
        if (amount == 0) revert ChannelHubZeroAmount();
        if (amount > MAX_DEPOSIT) revert ChannelHubDepositTooLarge(amount);
        _state[channelId] = ChannelState({
            deposit: uint104(amount), settled: 0, closeDeadline: 0, status: Status.Open
        });
        _parties[channelId] = Parties({payer: msg.sender, payee: payee, token: token});
        emit ChannelOpened(channelId, msg.sender, payee, token, salt, amount);
    }

    function _addDeposit(bytes32 channelId, uint256 amount) private {
        if (amount == 0) revert ChannelHubZeroAmount();
        ChannelState storage state = _state[channelId];
        uint256 deposit = uint256(state.deposit) + amount;
        if (deposit > MAX_DEPOSIT) revert ChannelHubDepositTooLarge(deposit);
        state.deposit = uint104(deposit);
        emit ChannelToppedUp(channelId, amount, deposit);
    }

    /// @dev Marks the channel closed and credits what was not settled back to the payer.
    function _close(bytes32 channelId, ChannelState memory state) private {
        uint256 refund = uint256(state.deposit) - state.settled;
        _state[channelId].status = Status.Closed;
        Parties storage parties = _parties[channelId];
        if (refund != 0) _balances[parties.payer][parties.token] += refund;
        emit ChannelClosed(channelId, state.settled, refund);
    }

    function _requireOpen(bytes32 channelId) private view returns (Parties storage) {
        Status status = _state[channelId].status;
        if (status != Status.Open) {
            if (status == Status.None) revert ChannelHubUnknownChannel(channelId);
            revert ChannelHubChannelNotOpen(channelId);
        }
        return _parties[channelId];
    }

    function _debit(address account, address token, uint256 amount) private {
        uint256 balance = _balances[account][token];
        if (amount > balance) revert ChannelHubInsufficientBalance(token, balance, amount);
        // amount <= balance was checked on the line above.
        unchecked {
            _balances[account][token] = balance - amount;
        }
    }

    /// @dev Takes `amount` from the caller and returns what actually arrived.
    function _pull(address token, uint256 amount) private returns (uint256 received) {
        if (token == address(0)) {
            if (msg.value != amount) revert ChannelHubWrongValue(msg.value, amount);
            return amount;
        }
        if (msg.value != 0) revert ChannelHubWrongValue(msg.value, 0);
        if (amount == 0) revert ChannelHubZeroAmount();
        uint256 before = IERC20(token).balanceOf(address(this));
        IERC20(token).safeTransferFrom(msg.sender, address(this), amount);
        received = IERC20(token).balanceOf(address(this)) - before;
    }
}
